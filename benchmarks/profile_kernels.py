"""Where a training step's time goes: our loop under torch.profiler, kernels ranked by GPU time.

    python benchmarks/profile_kernels.py --model phi2 --data-xsum DIR --rows 2331 --tokens 16384
    python benchmarks/profile_kernels.py --model tinyllama --data-cnn DIR --tokens 8192 --trace out/trace.json
    python benchmarks/profile_kernels.py --tiny      # CPU, seconds; keeps the script working

Runs `summ.train.train()` as bench_train.py does (random weights from the real config, real row
lengths), each optimizer step one micro-batch of up to `--tokens` tokens: the step holds as many
rows as the budget holds at data.max_length (train.micro_batch_size = tokens // max_length,
train.grad_accum_steps=1; a `--set` of either wins), so shorter rows leave it partly empty and a
step never splits. A `--set train.micro_batch_tokens=...` wins over `--tokens`. Skips `--warmup`
optimizer steps, records `--steps`, and prints: wall time per step, GPU busy time and kernel
launches per step, the top kernels by GPU time, and that time grouped by kind (matmul, 4-bit
dequantize, attention, elementwise, ...).
`--trace` also writes a Chrome trace (open it in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_one_model_arguments, cap_memory, run_config  # noqa: E402

# First match wins; names are CUDA kernel names (and CPU op names when there is no GPU).
KINDS = (
    ("4-bit dequantize", ("dequantize", "kDequantize")),
    ("attention", ("flash", "fmha", "attention", "softmax", "cutlassF", "cutlassB", "efficient")),
    ("matmul", ("gemm", "Gemm", "cutlass", "sm90", "sm80", "nvjet", "addmm", "mm", "linear")),
    ("norm", ("norm", "Norm")),
    ("dropout / random", ("dropout", "bernoulli", "philox", "fused_dropout")),
    ("optimizer", ("Optimizer", "optimizer", "adam", "Adam", "kOptimizer")),
    ("copy / cast", ("copy", "Copy", "cast", "to_copy", "Memcpy", "Memset", "fill")),
    ("reduction", ("reduce", "Reduce", "sum", "max")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "Elementwise")),
)


def kind_of(name: str) -> str:
    for kind, needles in KINDS:
        if any(n in name for n in needles):
            return kind
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=8192,
                        help="token budget of a micro-batch; a step holds as many full-length rows as it fits")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before recording")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps recorded")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step's start is not marked)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from summ.data import padded_length
    from summ.train import train

    cap_memory(args.cap_gib)
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    marks: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"train.micro_batch_tokens={args.tokens}", *args.overrides]
        cfg = run_config(args, args.model, Path(tmp), tuple(sets))
        tokens = cfg.train.micro_batch_tokens  # a --set train.micro_batch_tokens=... overrides --tokens
        if tokens is None:
            parser.error("profile_kernels.py profiles micro-batches of a token budget: give --tokens")
        # Rows per step to fill one micro-batch of the budget in effect (a --set of either wins).
        fill = [f"train.micro_batch_size={max(1, tokens // padded_length(cfg.data.max_length))}",
                "train.grad_accum_steps=1"]
        cfg = run_config(args, args.model, Path(tmp), tuple(fill + sets))
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        with profile(activities=activities,
                     schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
                     record_shapes=False) as prof:
            def step_hook(*_):
                # The optimizer's step closes one recorded step; the profiler's schedule advances with it.
                if on_gpu:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.step()

            handle = register_optimizer_step_post_hook(step_hook)
            try:
                train(cfg)
            finally:
                handle.remove()

    device_time = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, device_time, 0) > 0]
    if on_gpu:  # kernels only: CPU-side ops also carry the device time of the kernels they launch
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events = [e for e in events if not e.key.startswith("ProfilerStep")]  # the step span, not work
    total_us = sum(getattr(e, device_time) for e in events)
    wall_s = (marks[args.warmup + args.steps - 1] - marks[args.warmup - 1]) / args.steps
    launches = sum(e.count for e in events) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    print(f"\n{args.model}, {rows} rows per step, token budget {tokens}, overrides {args.overrides or 'none'}; "
          f"peak allocated {peak:.2f} GiB")
    print(f"wall per optimizer step: {wall_s:.3f} s; {'GPU' if on_gpu else 'CPU'} busy per step: "
          f"{total_us / args.steps / 1e6:.3f} s ({100 * total_us / args.steps / 1e6 / max(wall_s, 1e-9):.0f}%); "
          f"{launches:,.0f} {'kernels' if on_gpu else 'ops'} per step")
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += getattr(e, device_time)
    print("\n| kind | ms per step | share |\n|---|---|---|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / args.steps / 1e3:.1f} | {100 * us / total_us:.1f}% |")
    print("\n| kernel | kind | calls per step | ms per step | share |\n|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -getattr(e, device_time))[:args.top]:
        us = getattr(e, device_time)
        print(f"| {e.key[:90]} | {kind_of(e.key)} | {e.count / args.steps:.0f} | {us / args.steps / 1e3:.1f} | "
              f"{100 * us / total_us:.1f}% |")
    summary = {"model": args.model, "tokens": tokens, "rows_per_step": rows, "overrides": args.overrides,
               "wall_s_per_step": wall_s, "busy_s_per_step": total_us / args.steps / 1e6, "kernels_per_step": launches,
               "peak_allocated_gib": peak,
               "ms_per_step_by_kind": {k: v / args.steps / 1e3 for k, v in by_kind.items()}}
    print("SUMMARY " + json.dumps(summary))
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
