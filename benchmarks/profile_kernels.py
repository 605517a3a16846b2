"""Where a training step's time goes: our loop under torch.profiler, kernels ranked by GPU time.

    python benchmarks/profile_kernels.py --model phi2 --data-xsum DIR --rows 2331 --tokens 16384
    python benchmarks/profile_kernels.py --model tinyllama --data-cnn DIR --tokens 8192 --trace out/trace.json
    python benchmarks/profile_kernels.py --tiny      # CPU, seconds; keeps the script working

Runs `summ.training.train()` as bench_train.py does (random weights from the real config, real row
lengths), each optimizer step one micro-batch of up to `--tokens` tokens: the step holds as many
rows as the budget holds at data.max_length (train.micro_batch_size = tokens // max_length,
train.grad_accum_steps=1; a `--set` of either wins), so shorter rows leave it partly empty and a
step never splits. A `--set train.micro_batch_tokens=...` wins over `--tokens`. Skips `--warmup`
optimizer steps, records `--steps`, and prints: wall time per step, GPU busy time and kernel
launches per step, the top kernels by GPU time, and that time grouped by kind (matmul, 4-bit
dequantize, attention, elementwise, ...).
`--trace` also writes a Chrome trace (open it in https://ui.perfetto.dev).

`--host` runs the same steps without the profiler and splits each step's wall time by what the
host was doing: building the batches, issuing the forward, issuing the backward, the rest of
queueing the window (with CUDA graphs: staging inputs and launching the replays), clipping, the
optimizer step, waiting for the GPU (the read-back of the loss and gradient norm), and the rest. A
step whose wait is small spent its time issuing work (host-bound: fewer launches or less Python
help); one whose wait dominates is GPU-bound. With compiled layers it also counts graph breaks.
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
    parser.add_argument("--host", action="store_true", help="split the wall time by host activity instead")
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step's start is not marked)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from summ.data import padded_length
    from summ.training import train

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
        if args.host:
            return host_split(args, cfg, rows, tokens)
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
    # Spans, not work: the step marks, and record_function ranges mirrored on the GPU timeline
    # (e.g. the optimizer's step), which would count their kernels twice.
    events = [e for e in events if not e.key.startswith("ProfilerStep") and not getattr(e, "is_user_annotation", False)]
    total_us = sum(getattr(e, device_time) for e in events)
    wall_s = (marks[args.warmup + args.steps - 1] - marks[args.warmup - 1]) / args.steps
    launches = sum(e.count for e in events) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    print(f"\n{args.model}, {rows} rows per step, token budget {tokens}, overrides {args.overrides or 'none'}; "
          f"peak allocated {peak:.2f} GiB")
    print(f"wall per optimizer step: {wall_s:.3f} s; {'GPU' if on_gpu else 'CPU'} busy per step: "
          f"{total_us / args.steps / 1e6:.3f} s ({100 * total_us / args.steps / 1e6 / max(wall_s, 1e-9):.0f}%); "
          f"{launches:,.0f} {'kernels' if on_gpu else 'ops'} per step")
    # Inductor names its generated kernels triton_*: whether compiled layers ran (inside a CUDA graph
    # too) shows here, not in the step time.
    compiled = [e for e in events if e.key.startswith("triton")]
    compiled_kernels = sum(e.count for e in compiled) / args.steps
    compiled_us = sum(getattr(e, device_time) for e in compiled)
    print(f"from compiled code: {compiled_kernels:,.0f} kernels, {compiled_us / args.steps / 1e3:.1f} ms per step")
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
               "compiled_kernels_per_step": compiled_kernels,
               "peak_allocated_gib": peak,
               "ms_per_step_by_kind": {k: v / args.steps / 1e3 for k, v in by_kind.items()}}
    print("SUMMARY " + json.dumps(summary))
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(args.trace)
    return 0


HOST_PHASES = ("batches", "forward", "backward", "queue window", "clip", "optimizer", "wait for GPU", "other")


def host_split(args, cfg, rows: int, tokens: int) -> int:
    """Wall time per optimizer step split by what the host did (see the module docstring)."""
    import accelerate
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import summ.speed.step as speed_step
    import summ.training as loop

    spent: dict[str, float] = defaultdict(float)
    marks: list[float] = []
    breaks_before = graph_breaks()  # an earlier compile in this process is not this run's
    per_step: list[dict[str, float]] = []
    nested: list[float] = [0.0]  # time of the phases running inside the current one

    def timed(phase: str, fn):
        # A phase's own time: what the phases it calls (read_back inside optimizer_step, forward
        # and backward inside queue_gradients) spend is theirs.
        def wrapper(*a, **kw):
            start = time.perf_counter()
            nested.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                total = time.perf_counter() - start
                spent[phase] += total - nested.pop()
                nested[-1] += total
        return wrapper

    def step_hook(*_):
        marks.append(time.perf_counter())
        per_step.append(dict(spent))
        spent.clear()

    # Where train() and its StepRunner look these names up: StepRunner.forward_backward calls
    # self.batches, then speed_step.queue_gradients, which calls its forward_summed_loss (not with CUDA
    # graphs: a replay is part of "queue window") and Accelerator.backward; train() calls
    # loop.optimizer_step, which calls loop.read_back. StepRunner.record_graphs builds every step's
    # batches before step 1, into the setup, not into a measured step.
    patches = [(speed_step.StepRunner, "batches", timed("batches", speed_step.StepRunner.batches)),
               (speed_step, "forward_summed_loss", timed("forward", speed_step.forward_summed_loss)),
               (speed_step, "queue_gradients", timed("queue window", speed_step.queue_gradients)),
               (loop, "read_back", timed("wait for GPU", loop.read_back)),
               (loop, "optimizer_step", timed("optimizer", loop.optimizer_step)),
               (accelerate.Accelerator, "backward", timed("backward", accelerate.Accelerator.backward)),
               (accelerate.Accelerator, "clip_grad_norm_", timed("clip", accelerate.Accelerator.clip_grad_norm_))]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    handle = register_optimizer_step_post_hook(step_hook)
    try:
        from summ.training import train

        train(cfg)
    finally:
        handle.remove()
        for owner, name, original in originals:
            setattr(owner, name, original)

    # per_step[i] holds what ran up to optimizer step i's end (step 0 also holds the setup).
    first, last = args.warmup, args.warmup + args.steps - 1
    wall_s = (marks[last] - marks[first - 1]) / args.steps
    phases = {p: sum(s.get(p, 0.0) for s in per_step[first:last + 1]) / args.steps for p in HOST_PHASES[:-1]}
    phases["other"] = wall_s - sum(phases.values())
    on_gpu = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    breaks = graph_breaks() - breaks_before
    print(f"\n{args.model}, {rows} rows per step, token budget {tokens}, overrides {args.overrides or 'none'}; "
          f"peak allocated {peak:.2f} GiB; graph breaks {breaks}")
    print(f"wall per optimizer step: {wall_s:.3f} s\n\n| host activity | ms per step | share |\n|---|---|---|")
    for phase in HOST_PHASES:
        print(f"| {phase} | {1e3 * phases[phase]:.1f} | {100 * phases[phase] / wall_s:.0f}% |")
    summary = {"model": args.model, "tokens": tokens, "rows_per_step": rows, "overrides": args.overrides,
               "wall_s_per_step": wall_s, "host_ms_per_step": {p: 1e3 * v for p, v in phases.items()},
               "graph_breaks": breaks, "peak_allocated_gib": peak}
    print("SUMMARY " + json.dumps(summary))
    return 0


def graph_breaks() -> int:
    """Graph breaks torch.compile hit in this process (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


if __name__ == "__main__":
    sys.exit(main())
