"""Data-parallel scaling of our loop: the same optimizer steps on 1 and N processes, in one invocation.

    python benchmarks/bench_scaling.py --models phi2 tinyllama --processes 1 2 --data-xsum DIR --data-cnn DIR
    ACCELERATE_USE_CPU=1 python benchmarks/bench_scaling.py --tiny --processes 1 2 --no-dropout   # CPU, gloo

For each model and process count P it trains with `summ.training.train()` under `accelerate launch
--multi_gpu --num_processes P` (P = 1: a plain process), with bench_train.py's settings of our loop
("ours": train.micro_batch_size rows per process and step, run as micro-batches of a token budget;
random weights from the real configs, the same rows) and the same global batch: every optimizer step
holds max(--processes) x train.micro_batch_size rows, accumulated on one process or split over the
ranks, so every process count trains on the same rows in the same steps. Reported: non-pad
tokens/s summed over the ranks (log.jsonl counts them all-reduced), speed-up and scaling efficiency
against one process, peak GPU memory of every rank, and each process count's per-step training
losses with the largest difference from one process, also plotted (`--no-dropout` makes them
comparable to float noise). Output: bench_scaling.json, bench_scaling.md and loss_curves_<model>.png
under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (MODELS, REPO, TINY_OVERRIDES, add_data_arguments, cap_memory, describe,  # noqa: E402
                         environment, header, ours_settings, run_config, summarize_steps, write_results)
from summ.files import json_records, write_atomic  # noqa: E402  (bench_train puts the repository on the path)



def dropout_off(model: str) -> dict:
    """The architecture's dropout settings at 0: per-step losses of 1 and N processes then differ only
    by the order of floating-point sums (dropout masks are drawn per rank)."""
    config = json.loads((REPO / MODELS[model]["fixture"] / "config.json").read_text())
    return {k: 0.0 for k, v in config.items() if "drop" in k and isinstance(v, float)}


def settings(args, model: str, processes: int) -> tuple[str, ...]:
    """bench_train's settings of our loop, with the global batch fixed at max(--processes) x
    train.micro_batch_size rows: each process accumulates max(--processes) / processes of them."""
    sets = [s for s in ours_settings(args, model, "ours") if not s.startswith("train.grad_accum_steps=")]
    sets.append(f"train.grad_accum_steps={max(args.processes) // processes}")
    if args.no_dropout:
        sets += ["lora.dropout=0",
                 "model.config_overrides=" + json.dumps({**(TINY_OVERRIDES[model] if args.tiny else {}), **dropout_off(model)})]
    return tuple(sets)


def run_child(args, model: str, processes: int) -> dict:
    """One rank of one measurement; rank 0 also reads the run's log (written by rank 0 only)."""
    from summ.training import train

    out_dir = Path(args.run_dir)
    cfg = run_config(args, model, out_dir, settings(args, model, processes))
    result = train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "peak_allocated_gib": result.metrics.get("memory/peak_allocated_gib"),
              "peak_reserved_gib": result.metrics.get("memory/peak_reserved_gib")}
    if rank == 0:
        steps = [x for x in json_records(out_dir / "log.jsonl") if "train/tokens" in x]
        record.update(summarize_steps([x["train/seconds"] for x in steps], [x["train/tokens"] for x in steps],
                                      args.warmup),
                      losses=result.train_losses, micro_batch=describe(cfg, result.metrics))
    return record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, model: str, processes: int) -> dict:
    """Launch one process count and merge its ranks' results."""
    with tempfile.TemporaryDirectory() as run_dir:
        child = [__file__, *sys.argv[1:], "--child", model, str(processes), run_dir]
        if processes == 1:
            cmd = [sys.executable, *child]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *child]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        # One file per rank: ranks printing to the same pipe can interleave their lines.
        ranks = [json.loads(f.read_text()) for f in sorted(Path(run_dir).glob("result-rank*.json"))]
    if proc.returncode != 0 or len(ranks) != processes:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"{model} x{processes}: FAILED ({tail[0]})\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": tail[0]}
    ranks.sort(key=lambda r: r["rank"])
    return {**{k: v for k, v in ranks[0].items() if k not in ("rank", "peak_allocated_gib", "peak_reserved_gib")},
            "peak_allocated_gib": [r["peak_allocated_gib"] for r in ranks],
            "peak_reserved_gib": [r["peak_reserved_gib"] for r in ranks]}


def compare(runs: dict[int, dict]) -> None:
    """Speed-up, efficiency and the largest per-step loss difference, each against the one-process run."""
    one = runs.get(1)
    for processes, r in runs.items():
        if "error" in r or not one or "error" in one:
            continue
        r["speedup"] = r["non_pad_tokens_per_s"] / one["non_pad_tokens_per_s"]
        r["efficiency"] = r["speedup"] / processes
        r["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], one["losses"]))


def markdown(results: dict) -> str:
    lines = [*header(results),
             "| model | processes | rows per step and micro-batches (per process) | non-pad tok/s (all ranks) "
             "| x one process | scaling efficiency "
             "| peak alloc GiB per rank | max abs loss diff vs one process |",
             "|---|---|---|---|---|---|---|---|"]
    for model, runs in results["models"].items():
        for processes, r in runs.items():
            if "error" in r:
                lines.append(f"| {model} | {processes} | failed: {r['error'][:80]} | | | | | |")
                continue
            memory = " / ".join("n/a" if m is None else f"{m:.2f}" for m in r["peak_allocated_gib"])
            lines.append(f"| {model} | {processes} | {r['micro_batch']} | {r['non_pad_tokens_per_s']:,.0f} | "
                         f"{r.get('speedup', float('nan')):.2f}x | {r.get('efficiency', float('nan')):.0%} | "
                         f"{memory} | {r.get('max_abs_loss_diff', float('nan')):.2e} |")
    return "\n".join(lines) + "\n"


def plot_losses(model: str, runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for processes, r in runs.items():
        if "losses" in r:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", markersize=3,
                    label=f"{processes} process{'es' if processes > 1 else ''}")
    ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{model}: the same global batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["phi2", "tinyllama"], choices=sorted(MODELS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2],
                        help="process counts; each must divide the largest")
    add_data_arguments(parser, measured_steps=True)
    parser.add_argument("--tokens", type=int,
                        help="token budget per micro-batch, rows per step unchanged (default: bench_train's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every run")
    parser.add_argument("--no-dropout", action="store_true", help="LoRA and model dropout off (comparable losses)")
    parser.add_argument("--cap-gib", type=float, default=15.0, help="GPU memory cap per process")
    parser.add_argument("--tiny", action="store_true", help="2-layer models, CPU-sized: keeps the script working")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PROCESSES", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}
    args.t4_overrides, args.variants = [], []  # what ours_settings reads for bench_train's other rows
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if any(p < 1 or max(args.processes) % p for p in args.processes):
        parser.error(f"--processes {args.processes}: each count must be >= 1 and divide the largest")

    if args.child:
        model, processes, args.run_dir = args.child[0], int(args.child[1]), args.child[2]
        cap_memory(args.cap_gib)
        result = run_child(args, model, processes)
        write_atomic(Path(args.run_dir) / f"result-rank{result['rank']}.json", json.dumps(result))
        return 0

    results = {"environment": environment(), "command": " ".join(["python"] + sys.argv), "models": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        runs = results["models"][model] = {}
        for processes in sorted(set(args.processes)):
            started = time.perf_counter()
            runs[processes] = measure(args, model, processes)
            if "error" not in runs[processes]:
                print(f"{model} x{processes}: {runs[processes]['non_pad_tokens_per_s']:,.0f} tok/s "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        compare(runs)
        plot_losses(model, runs, out / f"loss_curves_{model}.png")
    table = markdown(results)
    write_results(out, "bench_scaling", results, table)
    print(table)
    return 0 if all("error" not in r for runs in results["models"].values() for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
