"""Command line. It only parses and wires; the work lives in the `summ` package.

    python run.py --config configs/xsum.json [--set train.lr=1e-4] [--resume [CHECKPOINT]]   # train (+ eval)
    python run.py eval --run runs/xsum [--zero-shot] [--set eval.num_beams=4]
    python run.py predict --run runs/xsum --text-file article.txt   (or --jsonl FILE, or stdin)
    python run.py predict --run runs/xsum --merge merged/            # adapter folded into the weights

Training also runs under `accelerate launch run.py ...` for several GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Before torch initialises CUDA: growing one segment instead of caching fixed blocks stops the
# fragmentation that variable-length micro-batches and a growing KV cache cause (at 64 x 512
# tokens of Phi-2 generation, 4-6 GiB reserved but unusable under a 15 GiB cap).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

COMMANDS = ("train", "eval", "predict")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning of causal LMs into news summarizers")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.lr=1e-4")

    train = sub.add_parser("train", help="fine-tune, then evaluate (the default command)")
    train.add_argument("--config", required=True, help="a JSON config, e.g. configs/xsum.json")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint of log.output_dir, or from CHECKPOINT")
    overrides(train)

    ev = sub.add_parser("eval", help="score a run's adapter (or the base model) on data.eval_split")
    ev.add_argument("--run", help="a run folder (its config.json and adapter/ are used)")
    ev.add_argument("--config", help="a config instead of --run's; needed with --zero-shot and no run")
    ev.add_argument("--zero-shot", action="store_true", help="score the base model without the adapter")
    overrides(ev)

    pr = sub.add_parser("predict", help="summarize new articles with a run's adapter")
    pr.add_argument("--run", required=True, help="a trained run folder")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="a text file holding one article ('-' or nothing: stdin)")
    src.add_argument("--jsonl", help="a jsonl file with one {\"id\", \"article\"} object per line")
    pr.add_argument("--out", help="write {id, summary, stop_reason} lines here instead of printing")
    pr.add_argument("--merge", metavar="OUT", help="write the base model with the adapter merged in (safetensors)")
    overrides(pr)

    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train", *argv]
    return parser.parse_args(argv)


def run_config(args):
    from summ.config import ConfigError, load_config

    if getattr(args, "config", None):
        return load_config(args.config, args.overrides)
    if not args.run:
        raise ConfigError("eval: pass --run RUN_DIR, or --config with --zero-shot")
    return load_config(Path(args.run) / "config.json", args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SUMM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from summ.config import ConfigError
    from summ.data import DataError
    from summ.train import TrainingDiverged

    try:
        config = run_config(args)
        if args.command == "train":
            from summ.train import train

            result = train(config, resume=args.resume)
            print(f"trained: {result.steps} steps, final val loss {result.metrics['final_val_loss']}, "
                  f"outputs in {result.run_dir}")
            if config.eval.generate:
                from summ.evaluate import evaluate_run

                evaluate_run(config, result.run_dir)
                print(f"report: {result.run_dir / 'eval' / 'eval_report.md'}")
        elif args.command == "eval":
            from summ.evaluate import evaluate_run

            run_dir = Path(args.run) if args.run else Path(config.log.output_dir)
            metrics = evaluate_run(config, run_dir, zero_shot=args.zero_shot)
            folder = run_dir / ("zero_shot" if args.zero_shot else "eval")
            rouge = " ".join(f"{k} {v['mean']:.2f}" for k, v in metrics["rouge"].items())
            print(f"val loss {metrics['val_loss']:.4f}, {rouge}; report: {folder / 'eval_report.md'}")
        else:
            from summ.predict import merge_adapter, read_articles, summarize

            if args.merge:
                print(f"merged model written to {merge_adapter(config, args.run, args.merge)}")
                if not (args.text_file or args.jsonl):
                    return 0
            articles = read_articles(text_file=args.text_file, jsonl=args.jsonl)
            generations = summarize(config, args.run, [a["article"] for a in articles])
            lines = [{"id": a["id"], "summary": g.text, "stop_reason": g.stop_reason}
                     for a, g in zip(articles, generations)]
            if args.out:
                Path(args.out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            else:
                for x in lines:
                    print(x["summary"] if len(lines) == 1 else json.dumps(x, ensure_ascii=False))
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
