"""The fastest micro-batch that fits: token budget x recomputed layers, measured in one process.

    python benchmarks/tune_microbatch.py --model phi2 --data-xsum DIR --rows 2331 --budgets 2048 4096 8192 16384
    python benchmarks/tune_microbatch.py --model tinyllama --data-cnn DIR --cap-gib 15   # a T4's memory
    python benchmarks/tune_microbatch.py --tiny       # CPU, seconds; keeps the script working

Both settings are execution settings: they decide how an optimizer step's rows
(train.micro_batch_size x train.grad_accum_steps, the optimization) run, never the step's gradient.

Loads the model once (random weights from the real config, real row lengths, the config's dtype),
then for each token budget, smallest first, tries recomputing (gradient checkpointing) on 0, 4,
8, ... of the decoder layers, fewest first, and keeps the first that fits: a layer that does not
recompute saves a third of its compute and holds its activations instead. The best point is the
fastest measured one: on an H100 a larger micro-batch with every layer recomputed beat a smaller
one with none (the step is launch-bound below ~8k tokens), so both axes are searched. The
micro-batches of a budget are built as the training loop builds them: length-grouped rows (the
training plan, with steps of about 8 budgets' worth of rows) regrouped by
`summ.data.split_by_tokens`. Each tried point runs `--warmup` + `--steps` optimizer steps of one
such micro-batch each (accumulate_gradients, clipping, the optimizer), the longest micro-batch
first, so a point that does not fit fails at once. A point "fits" when its peak reserved memory
stays `--margin-gib` under the cap.

Prints a table of every point (tokens/s, s/step, rows per micro-batch, peak allocated/reserved, or
out of memory) and the fastest point that fits as config overrides (`BEST ...`), and, apart from
them, the rows per step that fill one micro-batch of that budget (`ROWS ...`): a step of fewer rows
runs as one smaller micro-batch, and choosing more rows per step changes the optimization, so it is
yours to decide. Writes tune_<model>.json / .md and best_sets.txt (the BEST overrides) under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (REPO, add_one_model_arguments, cap_memory, encoded_rows, environment,  # noqa: E402
                         run_config)

GIB = 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_model_arguments(parser)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 3072, 4096, 6144, 8192, 12288, 16384])
    parser.add_argument("--layer-step", type=int, default=4, help="recomputed layers tried: 0, step, 2 x step, ...")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="recomputed layer counts to try (instead of --layer-step)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--margin-gib", type=float, default=0.75)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}

    import torch
    from accelerate import Accelerator
    from transformers.modeling_layers import GradientCheckpointingLayer

    from summ.data import collate, collate_packed, padded_length, plan_batches, split_by_tokens
    from summ.model import build_model, limit_checkpointing
    from summ.optimizer import make_optimizer
    from summ.precision import resolve_compute_dtype
    from summ.precision import mixed_precision_mode
    from summ.train import accumulate_gradients

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cap_memory(args.cap_gib)
    sets = ["train.grad_accum_steps=1", "model.gradient_checkpointing=true", *args.overrides]
    cfg = run_config(args, args.model, out / "unused-run", tuple(sets))
    tokenizer, examples = encoded_rows(cfg)
    lengths = [len(e.input_ids) for e in examples]
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(cfg.train.mixed_precision))
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    model = build_model(cfg, device, resolve_compute_dtype(cfg.quant.compute_dtype, device))
    optimizer = make_optimizer(model, cfg.train, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    lora = [p for p in model.parameters() if p.requires_grad]
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    n_layers = len(blocks)
    layer_counts = sorted(set(args.layers) if args.layers else (set(range(0, n_layers, args.layer_step)) | {n_layers}))

    packed = cfg.train.packing
    pack_into = padded_length(cfg.data.max_length) if packed else None

    def micro_batches(budget: int) -> list[list[int]]:
        """Micro-batches of at most `budget` tokens, as the loop builds them: the plan's length-grouped
        steps (about 8 budgets' worth of rows each, the longest first) regrouped by the budget."""
        rows = max(1, 8 * budget // padded_length(int(statistics.median(lengths))))
        plan = plan_batches(lengths, micro_batch_size=rows, seed=cfg.train.seed, epoch=0,
                            length_grouping=cfg.train.length_grouping, shuffle=cfg.train.shuffle)
        return [m for step in plan for m in split_by_tokens(step, lengths, budget, pack_into=pack_into)]

    def run_point(budget: int) -> dict:
        # Train mode, as in summ.train: in eval mode transformers skips checkpointing (and dropout),
        # which would make every point look like "no recompute".
        model.train()
        plan = micro_batches(budget)
        seconds, tokens, rows = [], [], []
        for i in range(args.warmup + args.steps):
            chosen = [examples[j] for j in plan[i % len(plan)]]
            batch = collate_packed(chosen, pack_into, tokenizer.pad_token_id) if packed else \
                collate(chosen, tokenizer.pad_token_id)
            started = time.perf_counter()
            accumulate_gradients(model, [batch], accelerator)
            accelerator.clip_grad_norm_(lora, cfg.train.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                seconds.append(time.perf_counter() - started)
                tokens.append(int(batch["attention_mask"].sum()))
                rows.append(len(chosen))
        return {"layers_recomputing": sum(b.gradient_checkpointing and b.training for b in blocks),
                "rows_per_micro_batch_median": statistics.median(rows),
                "non_pad_tokens_per_s": sum(tokens) / sum(seconds), "s_per_step_median": statistics.median(seconds),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None}

    points, start = [], 0
    for budget in sorted(args.budgets):
        # A larger budget never needs fewer recomputing layers than a smaller one did.
        for layers in [k for k in layer_counts if k >= start]:
            limit_checkpointing(model, layers)
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            point = {"budget": budget, "recomputed_layers": layers}
            try:
                point.update(run_point(budget))
            except torch.cuda.OutOfMemoryError:
                point["error"] = "out of memory"
            optimizer.zero_grad(set_to_none=True)
            reserved = point.get("peak_reserved_gib")
            point["fits"] = "error" not in point and (reserved is None or reserved <= args.cap_gib - args.margin_gib)
            points.append(point)
            print(json.dumps(point), flush=True)
            if point["fits"]:
                start = layers
                break

    fitting = [p for p in points if p["fits"]]
    best = max(fitting, key=lambda p: p["non_pad_tokens_per_s"]) if fitting else None
    # How a step runs (the same gradient at any of these); the rows per step that fill one such
    # micro-batch are reported apart: choosing them changes the optimization.
    best_sets = [] if best is None else [f"train.micro_batch_tokens={best['budget']}",
                                         f"model.checkpointed_layers={best['recomputed_layers']}"]
    fill_rows = None if best is None else max(1, int(best["rows_per_micro_batch_median"]))
    rows_sets = [] if best is None else [f"train.micro_batch_size={fill_rows}", "train.grad_accum_steps=1"]
    env = environment()
    lines = [f"# Micro-batch tuning: {args.model} on {env['device']}, cap {args.cap_gib} GiB (margin "
             f"{args.margin_gib}), {cfg.train.mixed_precision} / {cfg.quant.compute_dtype}; {env['date']}", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             f"| token budget | recomputed layers (of {n_layers}) | non-pad tok/s | s/step median | "
             f"rows per micro-batch (median) | peak alloc / reserved GiB | fits |", "|---|---|---|---|---|---|---|"]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['budget']} | {p['recomputed_layers']} | {p['error']} | | | | no |")
            continue
        mem = ("n/a" if p["peak_allocated_gib"] is None
               else f"{p['peak_allocated_gib']:.2f} / {p['peak_reserved_gib']:.2f}")
        mark = "**best**" if p is best else ("yes" if p["fits"] else "over the margin")
        lines.append(f"| {p['budget']} | {p['recomputed_layers']} | {p['non_pad_tokens_per_s']:,.0f} | "
                     f"{p['s_per_step_median']:.3f} | {p['rows_per_micro_batch_median']:g} | {mem} | {mark} |")
    lines += ["", f"Best: `{' '.join('--set ' + s for s in best_sets) or 'nothing fits'}` (how a step's rows run; "
              f"the same gradient at any budget)."]
    if best is not None:
        held = f"{fill_rows} row{'s' if fill_rows != 1 else ''}"
        lines += ["", f"A micro-batch of {best['budget']} tokens held {held} here (median). A step of "
                  f"fewer rows (train.micro_batch_size x train.grad_accum_steps; the shipped configs: 8) runs as "
                  f"one smaller micro-batch. More rows per step change the optimization (learning rate, number "
                  f"of steps), so they are set apart, e.g. `{' '.join('--set ' + s for s in rows_sets)}`."]
    (out / f"tune_{args.model}.json").write_text(json.dumps(
        {"environment": env, "model": args.model, "layers": n_layers, "points": points, "best": best_sets,
         "rows_per_step_to_fill_best": rows_sets}, indent=2) + "\n")
    (out / f"tune_{args.model}.md").write_text("\n".join(lines) + "\n")
    (out / "best_sets.txt").write_text(" ".join(best_sets) + "\n")
    print("\n".join(lines))
    print("BEST " + " ".join(best_sets))
    print("ROWS " + " ".join(rows_sets))
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
