"""Evaluation generation speed: our batched generation against the reference's one-article-at-a-time.

    python benchmarks/bench_generate.py --data-xsum DIR --rows 500            # Phi-2, 48 new tokens forced
    python benchmarks/bench_generate.py --tiny                                # CPU, seconds; keeps it working

Phi-2 with random weights built from the real config, loaded as evaluation loads it (4-bit NF4 base
plus a LoRA adapter), prompts from real XSum validation rows with the real tokenizer and template.
Every article gets exactly `--new-tokens` new tokens (EOS and stop strings cannot end it early), so
the time measures generation, not what random weights happen to say.

  ours       summ.evaluate.generate_summaries: longest prompts first, left-padded batches, KV cache
  reference  model.generate on one article at a time (the reference notebook's loop), timed on the
             first --reference-rows articles and extrapolated to all rows (marked as such)

Each runner is its own process under the GPU memory cap. Output: JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, TINY_OVERRIDES, cap_memory, environment  # noqa: E402


def eval_config(args):
    from summ.config import load_config

    sets = ["model.init=random", f"model.name_or_path={REPO / 'tests/fixtures/phi-2'}",
            f"data.dataset={args.data_xsum}", "data.train_split=train", "data.eval_split=validation",
            f"data.max_eval_rows={args.rows}", f"eval.max_new_tokens={args.new_tokens}", "eval.stop_strings=[]"]
    if args.batch_size:
        sets.append(f"eval.generate_batch_size={args.batch_size}")
    sets += args.overrides
    if args.tiny:
        sets += ["model.config_overrides=" + json.dumps(TINY_OVERRIDES["phi2"]), "data.max_length=128",
                 "data.min_article_tokens=16", "quant.compute_dtype=float32", "model.attn_implementation=eager"]
    return load_config(REPO / "configs/xsum.json", sets)


def run(args, runner: str) -> dict:
    import torch
    from peft import get_peft_model

    from summ.data import Encoder, load_rows
    from summ.evaluate import generate_summaries
    from summ.model import load_base_model, load_tokenizer, peft_lora_config
    from summ.precision import resolve_compute_dtype

    cfg = eval_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    rows, _ = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    articles = [r["article"] for r in rows]
    dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)
    model = load_base_model(cfg, device, dtype)
    # A fresh adapter costs what a trained one does at generation time.
    model = get_peft_model(model, peft_lora_config(cfg, model.config.model_type)).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = args.new_tokens
    if runner == "ours":
        generations, speed = generate_summaries(model, tokenizer, encoder, articles, cfg.eval, device,
                                                min_new_tokens=n)
        assert all(g.new_tokens == n for g in generations), "a generation stopped early"
        seconds, timed = speed["seconds"], len(articles)
        how = f"batches of {cfg.eval.generate_batch_size}, {cfg.eval.cache_implementation} KV cache"
    else:
        timed = min(args.reference_rows, len(articles))
        started = time.perf_counter()
        with torch.no_grad():
            for article in articles[:timed]:
                ids = torch.tensor([encoder.encode_prompt(article, n)], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                assert out.shape[1] - ids.shape[1] == n
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) * len(articles) / timed
        how = f"1 article at a time ({timed} timed, extrapolated to {len(articles)})"
    return {"articles": len(articles), "timed_articles": timed, "new_tokens_each": n, "seconds": seconds,
            "articles_per_s": len(articles) / seconds, "generated_tokens_per_s": len(articles) * n / seconds,
            "how": how, "dtype": str(dtype).replace("torch.", ""),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-xsum", default=str(REPO / "data" / "xsum_sample"))
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, help="default: eval.generate_batch_size of configs/xsum.json")
    parser.add_argument("--reference-rows", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set eval.cache_implementation=static")
    parser.add_argument("--runners", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    parser.add_argument("--cap-gib", type=float, default=15.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        cap_memory(args.cap_gib)
        print("RESULT " + json.dumps(run(args, args.child)), flush=True)
        return 0

    results = {"environment": environment(), "command": " ".join(["python"] + sys.argv), "runners": {}}
    for runner in args.runners:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", runner],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results["runners"][runner] = {"error": tail[0]}
            print(f"{runner}: FAILED ({tail[0]})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results["runners"][runner] = json.loads(lines[-1][len("RESULT "):])
    env = results["environment"]
    table = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}; {env['date']}.", f"Command: `{results['command']}`", "",
             "| runner | how | articles | new tokens each | seconds | articles/s | generated tok/s | peak alloc GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for runner, r in results["runners"].items():
        if "error" in r:
            table.append(f"| {runner} | failed: {r['error'][:80]} | | | | | | |")
            continue
        mem = "n/a" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}"
        table.append(f"| {runner} | {r['how']} | {r['articles']} | {r['new_tokens_each']} | {r['seconds']:.1f} | "
                     f"{r['articles_per_s']:.2f} | {r['generated_tokens_per_s']:,.0f} | {mem} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_generate.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench_generate.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if all("error" not in r for r in results["runners"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
