"""Where the GPU memory of one optimizer step goes, for one model and our loop.

    python benchmarks/profile_vram.py --model phi2 --data-xsum DIR [--tokens 4096] [--set key=value ...]
    python benchmarks/profile_vram.py --model phi2 --data-xsum DIR --set train.auto_micro_batch=false
                                                    # the recipe's steps as stated: 8 micro-batches of 1 row
    python benchmarks/profile_vram.py --tiny        # CPU: the static breakdown only, keeps the script working

Writes under --out:
  vram_breakdown.json / .md   4-bit weights (with quantization constants), other frozen weights, LoRA
                              parameters and gradients, optimizer state, and the step's transient
                              memory (activations, recompute, logits and loss) from the allocator's peak
  memory_snapshot.pickle      on a GPU: torch.cuda.memory snapshot of the step, for
                              https://pytorch.org/memory_viz (drag the file in)
  memory_timeline.png         on a GPU: allocated memory across the step (needs matplotlib)

The run is set up as `summ.training.train()` sets it up (`setup_data`, `setup_model`,
`summ.speed.step.setup_step_runner`), and the measured step is the loop's own: the runner's
forward and backward over the plan's first optimizer step (train.micro_batch_size x
train.grad_accum_steps rows; with length grouping the plan's longest micro-batch among them), then
clipping and `summ.training.optimizer_step`. Its rows run in the micro-batches the loop runs: of the
token budget (`--tokens` or train.micro_batch_tokens), of the budget the loop's memory probe chooses
on a GPU (train.auto_micro_batch; on a CPU the whole step), as planned with
train.auto_micro_batch=false, or as CUDA graphs (train.cuda_graphs). It is the second step on those
rows, so the optimizer state exists, as in every step after the first.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, add_one_model_arguments, cap_memory, run_config  # noqa: E402

GIB = 2**30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_bytes(model) -> tuple[int, set]:
    """Packed 4-bit weights plus their quantization constants (absmax, nested double-quant state)."""
    import bitsandbytes as bnb

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            seen.add(id(weight))
            total += tensor_bytes([weight.data])
            state = getattr(weight, "quant_state", None)
            if state is not None:
                total += tensor_bytes([state.absmax, state.code])
                if getattr(state, "nested", False):
                    total += tensor_bytes([state.state2.absmax, state.state2.code])
    return total, seen


def optimizer_state_bytes(optimizer) -> int:
    import torch

    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def timeline_png(snapshot: dict, start_bytes: int, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    allocated, points = start_bytes, []
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            allocated += event["size"]
        elif event["action"] == "free_completed":
            allocated -= event["size"]
        else:
            continue
        points.append(allocated / GIB)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(points, linewidth=0.8)
    ax.set_xlabel("allocator event (one optimizer step)")
    ax.set_ylabel("allocated GiB")
    ax.set_title("GPU memory across one optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None,
                        help="token budget per micro-batch; the rows per step stay the config's (default: "
                             "train.micro_batch_tokens, or the loop's own choice)")
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="skip recording the allocator history (memory_snapshot.pickle, memory_timeline.png)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}
    args.steps, args.warmup = 1, 0

    from summ.speed.step import OutOfMemory, setup_step_runner
    from summ.training import make_accelerator, optimizer_step, setup_data, setup_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cap_memory(args.cap_gib)
    extra = list(args.overrides) + ([f"train.micro_batch_tokens={args.tokens}"] if args.tokens else [])
    cfg = run_config(args, args.model, out / "unused-run", tuple(extra))
    t = cfg.train
    accelerator = make_accelerator(cfg, out / "unused-run")
    cuda = accelerator.device.type == "cuda"
    data = setup_data(cfg, accelerator)
    model, optimizer, _ = setup_model(cfg, accelerator, data.total_steps)
    try:
        runner = setup_step_runner(model, cfg, accelerator, data.train_examples, data.plan.lengths,
                                   data.tokenizer.pad_token_id)
    except OutOfMemory as error:
        print(error, file=sys.stderr)
        return 1
    micro_batching = runner.micro_batching
    first_step = data.plan.windows(0)[0]
    window = runner.batches(first_step)  # the micro-batches the step runs, as the loop builds them
    runner.record_graphs([first_step])

    quant, quantized_ids = quantized_bytes(model) if cfg.quant.enabled else (0, set())
    params = list(model.parameters())
    lora = [p for p in params if p.requires_grad]
    other_frozen = [p for p in params if not p.requires_grad and id(p) not in quantized_ids]

    def one_step() -> None:
        """One optimizer step as summ.training.train() takes it (less the schedule and the bookkeeping)."""
        model.train()
        loss_sum, n_labels, _ = runner.forward_backward(first_step)
        grad_norm = accelerator.clip_grad_norm_(lora, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        optimizer_step(accelerator, optimizer, loss_sum, n_labels, grad_norm)
        optimizer.zero_grad(set_to_none=not runner.keeps_grad_tensors)

    one_step()  # creates the optimizer state: the measured step is a steady-state one
    snapshot_mode = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    # Stack traces make the snapshot readable in memory_viz, but recording Python stacks crashed
    # the step on torch 2.11.0+cu130 ("SystemError: ... returned NULL without setting an
    # exception" in dropout); then the step reruns recording allocations without stacks.
    modes = [("alloc", "python"), (None, "python")] if cuda and args.snapshot else [None]
    for mode in modes:
        if mode is not None:
            torch.cuda.memory._record_memory_history(context=mode[0], stacks=mode[1], max_entries=1_000_000)
        try:
            one_step()
            snapshot_mode = mode
            break
        except SystemError as error:
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"recording with {mode} failed ({error}); retrying without stack traces", file=sys.stderr)
            optimizer.zero_grad(set_to_none=not runner.keeps_grad_tensors)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    rows = {
        "4-bit weights + quantization constants": quant,
        "other frozen weights (embeddings, lm_head, norms)": tensor_bytes(other_frozen),
        "LoRA parameters": tensor_bytes(lora),
        # Under CUDA graphs the gradients are zeroed in place, not freed: the graphs add into them.
        ("LoRA gradients (fp32, kept between steps: CUDA graphs)" if runner.keeps_grad_tensors else
         "LoRA gradients (fp32, freed after the step)"): tensor_bytes(lora),
        "optimizer state": optimizer_state_bytes(optimizer),
    }
    labelled = sum(int((b["labels"][:, 1:] != -100).any(0).sum()) * b["labels"].shape[0] for b in window)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows["logits + fp32 loss copy, largest micro-batch (estimate)"] = max(
        int((b["labels"][:, 1:] != -100).any(0).sum()) * b["labels"].shape[0] for b in window) * vocab * (2 + 4)
    result = {"model": args.model, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "rows_per_step": t.micro_batch_size * t.grad_accum_steps,
              "micro_batch_tokens": micro_batching.tokens, "recompute": micro_batching.recompute,
              "recomputed_layers": micro_batching.recomputed_layers,
              "micro_batching": micro_batching.describe(),
              # rows x padded length as they run (a CUDA graph's rows x its length)
              "micro_batches": [[runner.graphed.rows, runner.graphed.length_for(b)] if runner.graphed is not None
                                else list(b["input_ids"].shape) for b in window],
              "non_pad_tokens": sum(int(b["attention_mask"].sum()) for b in window),
              "labelled_positions_computed": labelled, "bytes": rows}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update({"static_before_step": static, "peak_allocated": peak,
                       "transient_peak_over_static": peak - static,
                       "peak_reserved": torch.cuda.max_memory_reserved()})
        if args.snapshot and snapshot_mode is not None:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            with open(out / "memory_snapshot.pickle", "wb") as f:
                pickle.dump(snapshot, f)
            result["snapshot_stack_traces"] = snapshot_mode[0] is not None
            result["timeline_png"] = timeline_png(snapshot, static, out / "memory_timeline.png")
    lines = [f"# Memory of one optimizer step: {args.model} on {result['device']}", "",
             f"{result['rows_per_step']} rows per optimizer step, run as {result['micro_batching']}.", "",
             f"Micro-batches (rows x padded length): {result['micro_batches']}; non-pad tokens "
             f"{result['non_pad_tokens']}.", "", "| part | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / GIB:.3f} |" for k, v in rows.items()]
    if cuda:
        lines += [f"| allocated before the step (weights, LoRA, optimizer state) | {static / GIB:.3f} |",
                  f"| **peak allocated during the step** | **{peak / GIB:.3f}** |",
                  f"| transient: activations, recompute, logits, loss, gradients | {(peak - static) / GIB:.3f} |",
                  f"| peak reserved | {result['peak_reserved'] / GIB:.3f} |"]
    (out / "vram_breakdown.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "vram_breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
