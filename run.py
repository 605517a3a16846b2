"""Command line. It only parses and wires; the work lives in the `summ` package.

    python run.py --config configs/xsum.json [--set train.lr=1e-4] [--resume [CHECKPOINT]]   # train (+ eval)
    python run.py eval --run runs/xsum [--zero-shot] [--set eval.num_beams=4]
    python run.py predict --run runs/xsum --text-file article.txt   (or --jsonl FILE, or stdin)
    python run.py predict --run runs/xsum --merge merged/ [--dtype bfloat16] [--force]   # adapter folded in
    python run.py export --run runs/xsum --out merged/ [--dtype float32] [--force]   # the same, for serving
    python run.py export --run runs/demo --out base/ --base-only   # the base a GGUF or random run's adapter needs
    python run.py eval --run runs/xsum --baseline lead         # LEAD-1 (XSum) / LEAD-3 (CNN/DM) on the same rows
    python run.py tune --config configs/demo.json [--search search.json] [--address ADDR] [--resume]
    python run.py report runs/a runs/search-b ... --out report/ [--baseline RUN --best RUN]

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

COMMANDS = ("train", "eval", "predict", "export", "tune", "report")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning of causal LMs into news summarizers")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.lr=1e-4")

    def trust_remote_code(p):
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a config with model.trust_remote_code true to run the model repository's code")

    train = sub.add_parser("train", help="fine-tune, then evaluate (the default command)")
    train.add_argument("--config", required=True, help="a JSON config, e.g. configs/xsum.json")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint of log.output_dir, or from CHECKPOINT")
    train.add_argument("--resume-changed", action="store_true",
                       help="with --resume: continue although values that change the updates or the data order "
                            "differ from the checkpoint's (each change is recorded in resumes.jsonl)")
    overrides(train)

    ev = sub.add_parser("eval", help="score a run's adapter (or the base model) on data.eval_split")
    ev.add_argument("--run", help="a run folder (its config.json and adapter/ are used)")
    ev.add_argument("--config", help="a config instead of --run's; needed with --zero-shot and no run")
    ev.add_argument("--zero-shot", action="store_true", help="score the base model without the adapter")
    ev.add_argument("--baseline", choices=("lead",),
                    help="score the extractive LEAD baseline (first sentences of the article) instead of a model")
    ev.add_argument("--name", help="write into RUN/NAME instead of RUN/eval (or RUN/zero_shot), e.g. to keep a "
                                   "beam-search evaluation beside the greedy one")
    trust_remote_code(ev)
    overrides(ev)

    pr = sub.add_parser("predict", help="summarize new articles with a run's adapter")
    pr.add_argument("--run", required=True, help="a trained run folder")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="a text file holding one article ('-' or nothing: stdin)")
    src.add_argument("--jsonl", help="a jsonl file with one {\"id\", \"article\"} object per line")
    pr.add_argument("--out", help="write {id, summary, stop_reason} lines here instead of printing")
    pr.add_argument("--merge", metavar="OUT", help="write the base model with the adapter merged in (safetensors)")
    pr.add_argument("--force", action="store_true", help="let --merge replace a non-empty folder")
    pr.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the --merge weights (default: the base model's own; float32 for random weights)")
    trust_remote_code(pr)
    overrides(pr)

    ex = sub.add_parser("export", help="a merged model folder for transformers, vLLM or TGI (or the adapter's base)")
    ex.add_argument("--run", required=True, help="a trained run folder")
    ex.add_argument("--out", required=True, help="the folder to write")
    ex.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the merged weights (default: the base model's own; float32 for random weights)")
    ex.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    ex.add_argument("--base-only", action="store_true",
                    help="write the base model the adapter attaches to (a GGUF rebuild, random weights or a "
                         "package's folder), not the merged model")
    trust_remote_code(ex)
    overrides(ex)

    tu = sub.add_parser("tune", help="search hyperparameters with Ray Tune (pip install -e '.[tune]')")
    tu.add_argument("--config", required=True, help="a JSON config; its \"search\" section is the search space")
    tu.add_argument("--search", help="a JSON file holding the search section instead of the config's")
    tu.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    tu.add_argument("--resume", action="store_true", help="restore the interrupted search in log.output_dir")
    overrides(tu)

    rp = sub.add_parser("report", help="compare runs and searches: tables, plots, published results, LEAD")
    rp.add_argument("paths", nargs="+", help="run folders and search folders")
    rp.add_argument("--out", required=True, help="folder for report.md, results.csv and the plots")
    rp.add_argument("--baseline", help="the row to show as the baseline: a run folder, its zero_shot/ or lead/ "
                                       "folder, or a row name (default: a zero-shot or LEAD row scored on the "
                                       "best run's rows)")
    rp.add_argument("--best", help="the run to show as the best")

    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train", *argv]
    return parser.parse_args(argv)


# What a training run writes itself; an evaluation --name must not land on one of them.
RUN_FOLDER_PARTS = {"adapter", "checkpoints", "tensorboard", "lead", "eval", "zero_shot"}


def run_config(args):
    """The config of the command, and for eval/predict every check that needs no model: a mistake in
    the options fails in milliseconds, before a model loads or a folder is created."""
    from summ.config import ConfigError, load_config

    if args.command == "report":
        return None
    if getattr(args, "config", None):
        source = Path(args.config)
    elif not args.run:
        raise ConfigError("eval: pass --run RUN_DIR, or --config with --zero-shot")
    else:
        source = Path(args.run) / "config.json"
    config = load_config(source, args.overrides)
    if args.command in ("eval", "predict", "export"):
        check_inference_args(args, config, source)
    return config


def check_inference_args(args, config, source: Path) -> None:
    from summ.config import ConfigError
    from summ.model import require_adapter

    if config.model.trust_remote_code and not args.trust_remote_code:
        where = next((f"--set {o}" for o in args.overrides if o.split("=", 1)[0].strip() == "model.trust_remote_code"),
                     str(source))
        raise ConfigError(f"{where}: model.trust_remote_code is true, which runs code from the model's repository; "
                          f"pass --trust-remote-code to allow it")
    if args.command == "eval":
        if args.baseline and args.zero_shot:
            raise ConfigError("--baseline lead and --zero-shot: pick one")
        if args.name is not None and (args.baseline or not args.name or args.name in RUN_FOLDER_PARTS
                                      or Path(args.name).name != args.name or args.name.startswith(".")):
            raise ConfigError(f"--name {args.name!r}: expected a new folder name inside the run (not "
                              f"{', '.join(sorted(RUN_FOLDER_PARTS))}, no '/'), and no --baseline")
        if not args.zero_shot and not args.baseline:
            run_dir = Path(args.run) if args.run else Path(config.log.output_dir)
            require_adapter(run_dir / "adapter", "train first, or pass --zero-shot to score the base model")
        return

    from summ.predict import MISSING_ADAPTER_HINT

    if args.command == "export":
        if args.base_only and args.dtype:
            raise ConfigError("--dtype: --base-only copies the base weights as they are; leave --dtype out")
        if not args.base_only:
            require_adapter(Path(args.run) / "adapter", MISSING_ADAPTER_HINT)
        return
    require_adapter(Path(args.run) / "adapter", MISSING_ADAPTER_HINT)
    if not args.merge:  # merge_adapter checks its target itself, before loading anything
        for flag, value in (("--force", args.force), ("--dtype", args.dtype)):
            if value:
                raise ConfigError(f"{flag}: only applies with --merge OUT")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {out}: is a folder; expected a file path")
        parent = out.parent
        if not parent.is_dir():
            raise ConfigError(f"--out {out}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: folder {parent} is not writable")


def end_processes() -> None:
    """After training and its evaluation: every rank is done, then the process group ends."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SUMM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from summ.config import ConfigError
    from summ.data import DataError
    from summ.checkpoint import CheckpointError
    from summ.files import WriteError
    from summ.runs import ReportError
    from summ.speed.step import OutOfMemory
    from summ.training import Preempted, TrainingError
    from summ.tune import ClusterUnreachable

    try:
        config = run_config(args)
        if args.command == "train":
            from summ.training import train

            if args.resume_changed and not args.resume:
                raise ConfigError("--resume-changed: only applies with --resume")
            result = train(config, resume=args.resume, accept_changes=args.resume_changed)
            say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # once per launch
            val, rows = result.metrics["final_val_loss"], result.metrics["data"]["eval"]["used"]
            # To the digits training prints at each validation, naming the step and rows it is of.
            last = (f"last val loss {val:.4f} (step {result.eval_history[-1]['step']}, {rows} "
                    f"{config.data.eval_split} rows)") if val is not None else "no validation"
            say(f"trained: {result.steps} steps, {last}, outputs in {result.run_dir}")
            if config.eval.generate:
                from summ.evaluation import evaluate_run

                evaluate_run(config, result.run_dir)
                say(f"report: {result.run_dir / 'eval' / 'eval_report.md'}")
            end_processes()
        elif args.command == "tune":
            from summ.tune import load_search, run_search

            # The config as loaded (with --set applied), and the search section of its file.
            search = load_search(json.loads(Path(args.config).read_text(encoding="utf-8-sig")), args.config,
                                 args.search)
            result = run_search(config.to_dict(), search, args.config, address=args.address, resume=args.resume)
            print(f"search: {len(result['trials'])} trials; table: {result['out_dir'] / 'trials.md'}"
                  + (f"; best config: {result['out_dir'] / 'best.json'}" if result["best"] else "; no trial completed"))
            if not result["best"]:
                return 3  # the trials' own folders and errors are in the table
        elif args.command == "report":
            from summ.compare import write_comparison

            written = write_comparison(args.paths, args.out, baseline=args.baseline, best=args.best)
            if written["baseline_note"]:
                print(f"warning: {written['baseline_note']}", file=sys.stderr)
            print(f"report: {Path(args.out) / 'report.md'}")
        elif args.command == "eval" and args.baseline:
            from summ.lead import evaluate_lead

            run_dir = Path(args.run) if args.run else Path(config.log.output_dir)
            metrics = evaluate_lead(config, run_dir)
            rouge = " ".join(f"{k} {v['mean']:.2f}" for k, v in metrics["rouge"].items())
            print(f"{metrics['baseline']}: {rouge}; files: {run_dir / 'lead'}")
        elif args.command == "export":
            from summ.predict import export_base, merge_adapter

            if args.base_only:
                print(f"base model written to {export_base(config, args.run, args.out, force=args.force)}")
            else:
                folder, dtype = merge_adapter(config, args.run, args.out, dtype=args.dtype, force=args.force,
                                              flag="--out")
                print(f"merged model written to {folder} ({str(dtype).removeprefix('torch.')}); serving: "
                      f"{folder / 'README.md'}")
        elif args.command == "eval":
            from summ.evaluation import evaluate_run

            run_dir = Path(args.run) if args.run else Path(config.log.output_dir)
            metrics = evaluate_run(config, run_dir, zero_shot=args.zero_shot, name=args.name)
            folder = run_dir / (args.name or ("zero_shot" if args.zero_shot else "eval"))
            rouge = " ".join(f"{k} {v['mean']:.2f}" for k, v in metrics["rouge"].items())
            print(f"val loss {metrics['val_loss']:.4f}, {rouge}; report: {folder / 'eval_report.md'}")
        else:
            from summ.files import write_atomic
            from summ.predict import merge_adapter, read_articles, summarize

            # Read the input before the merge: a bad file fails before any model loads.
            articles = read_articles(text_file=args.text_file, jsonl=args.jsonl) \
                if args.text_file or args.jsonl or not args.merge else None
            if args.merge:
                folder, dtype = merge_adapter(config, args.run, args.merge, dtype=args.dtype, force=args.force)
                print(f"merged model written to {folder} ({str(dtype).removeprefix('torch.')})")
                if articles is None:
                    return 0
            generations = summarize(config, args.run, [a["article"] for a in articles])
            lines = [{"id": a["id"], "summary": g.text, "stop_reason": g.stop_reason}
                     for a, g in zip(articles, generations)]
            if args.out:
                write_atomic(args.out, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            else:
                for x in lines:
                    print(x["summary"] if len(lines) == 1 else json.dumps(x, ensure_ascii=False))
    except (ConfigError, DataError, ReportError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        # A scheduler's SIGTERM or a Ctrl-C: the run is whole up to its checkpoint.
        resume = " ".join(a for a in (sys.argv if argv is None else ["run.py", *argv]) if a != "--resume")
        print(f"stopped: {e}; continue with: python {resume} --resume", file=sys.stderr)
        return e.exit_code
    except (TrainingError, OutOfMemory, CheckpointError, WriteError, ClusterUnreachable) as e:
        # The run started and stopped: its folder and last complete checkpoint are kept.
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (which checkpoints and stops by itself): files are written
        # atomically, so nothing half-written is left.
        print("interrupted; files already written are complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
