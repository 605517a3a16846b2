"""ROUGE of each variant's summaries in a bench_generate.json, against the references of the same rows.

    python benchmarks/rouge_by_variant.py OUT/bench_generate.json --data-xsum DIR --data-cnn DIR

Faster generation must not cost quality: this puts each variant's ROUGE-1/2/Lsum (with 95%
bootstrap intervals) side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DATASETS  # noqa: E402
from bench_train import REPO  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--data-xsum", default=str(REPO / "data" / "xsum_sample"))
    parser.add_argument("--data-cnn", default=str(REPO / "tests" / "fixtures" / "cnn_tiny"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from summ.config import load_config
    from summ.data import load_rows
    from summ.rouge import PAPER_KEYS, aggregate, score_pairs

    for r in json.loads(Path(args.results).read_text())["runs"]:
        if "error" in r:
            continue
        xsum = r["dataset"] == "xsum"
        sets = [f"data.dataset={args.data_xsum if xsum else args.data_cnn}", "data.train_split=train",
                "data.eval_split=validation"]
        sets += (["data.article_field=document", "data.summary_field=summary"] if xsum else
                 ["data.article_field=article", "data.summary_field=highlights", "data.dataset_config=null"])
        cfg = load_config(REPO / DATASETS[r["dataset"]], sets)
        rows, _ = load_rows(cfg.data, "validation", r["articles"])
        agg = aggregate(score_pairs(r["texts"], [x["summary"] for x in rows]), n_resamples=200, seed=0)
        print(r["model"], r["dataset"], r["variant"], " ".join(
            f"{k} {agg[k]['mean']:.2f} [{agg[k]['low']:.2f},{agg[k]['high']:.2f}]" for k in PAPER_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
