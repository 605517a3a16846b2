"""The LEAD-k baseline: the article's first k sentences as its summary.

News puts the key facts first, so LEAD is the floor every summarizer must beat, and it costs no
model: the same rows and the same ROUGE as `summ.evaluation.evaluate_run`, written beside its output
in `<run>/lead/`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from summ.config import RunConfig
from summ.data import load_rows
from summ.files import write_atomic, write_json
from summ.published import dataset_family
from summ.rouge import ROUGE_KEYS, aggregate, score_pairs, split_sentences
from summ.run_lock import hold_run_output

log = logging.getLogger(__name__)

LEAD_DIR = "lead"

# The published baselines: XSum's summaries are one sentence, CNN/DailyMail's about three highlights.
LEAD_K = {"xsum": 1, "cnn_dailymail": 3}
# LEAD-3 is the baseline news summarization papers report for any multi-sentence target, so a
# dataset we cannot name gets that one; a one-sentence dataset is recognised by name and gets LEAD-1.
DEFAULT_LEAD_K = 3


def lead_summary(article: str, k: int) -> str:
    """The first `k` sentences of `article`, one per line.

    One per line keeps the sentence boundaries the splitter chose, so ROUGE-Lsum scores exactly
    these k sentences (and the other ROUGE keys ignore line breaks)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return "\n".join(split_sentences(article)[:k])


def lead_k_for(cfg: RunConfig) -> int:
    """1 for XSum, 3 for CNN/DailyMail and for a dataset that is neither."""
    return LEAD_K.get(dataset_family(cfg.data.dataset, cfg.data.summary_field), DEFAULT_LEAD_K)


def evaluate_lead(cfg: RunConfig, run_dir: str | Path, k: int | None = None) -> dict:
    """Score LEAD-k on the rows `evaluate_run` summarizes (data.eval_split, data.max_eval_rows, then
    the first eval.generate_rows) and write `<run_dir>/lead/predictions.jsonl` and `eval_metrics.json`."""
    k = lead_k_for(cfg) if k is None else k
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, row_stats = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    rows = rows[:cfg.eval.generate_rows] if cfg.eval.generate_rows else rows
    predictions = [lead_summary(r["article"], k) for r in rows]
    scores = score_pairs(predictions, [r["summary"] for r in rows])
    metrics = {
        "baseline": f"lead-{k}", "k": k, "split": cfg.data.eval_split, "generated_rows": len(rows),
        "rows_skipped": row_stats.skipped,
        "rouge": aggregate(scores, n_resamples=cfg.eval.bootstrap_resamples, seed=cfg.train.seed),
    }

    hold_run_output(run_dir, LEAD_DIR, "LEAD baseline")
    out_dir = Path(run_dir) / LEAD_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "predictions.jsonl", "".join(
        json.dumps({"id": r["id"], "reference": r["summary"], "prediction": p, **{key: s[key] for key in ROUGE_KEYS}},
                   ensure_ascii=False) + "\n" for r, p, s in zip(rows, predictions, scores)))
    write_json(out_dir / "eval_metrics.json", metrics)
    log.info("LEAD-%d on %d rows: ROUGE-1/2/L/Lsum %s", k, len(rows),
             "/".join(f"{metrics['rouge'][key]['mean']:.2f}" for key in ROUGE_KEYS))
    return metrics
