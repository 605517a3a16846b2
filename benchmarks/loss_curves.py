"""Equal data, equal losses: our loop against the HF Trainer recipe, step by step, on the same rows.

    python benchmarks/loss_curves.py --data-xsum DIR --steps 25                 # the recipe, dropout on
    python benchmarks/loss_curves.py --data-xsum DIR --steps 25 --no-dropout    # numerics only
    python benchmarks/loss_curves.py --data-xsum DIR --micro-batch 8 --accumulation 1 --set model.checkpointed_layers=8
    python benchmarks/loss_curves.py --tiny --seed 3                            # CPU, seconds

Phi-2 with random weights built from the real config (the same weights for every runner), the
reference optimization (8 rows per optimizer step, batch 1 x accumulation 8, max length 512;
--micro-batch/--accumulation change it for every runner alike), the same LoRA initialisation (same
seed), paged 8-bit AdamW, cosine with warmup. Every runner trains the same rows in the same order:
our loop's plan of them (shuffled by train.seed, not grouped by length), which the HF Trainer is
given in that order (`hf_trainer_peer.py`). The HF Trainer runs micro-batches of --micro-batch
rows; our loop runs each step's rows in the micro-batches it chooses (train.auto_micro_batch: on a
GPU the largest its memory probe finds, on a CPU the whole step; `--set train.micro_batch_tokens=N`
for a budget of your own), which leaves each step's gradient, and so its loss, unchanged.

  hf_trainer   HF Trainer with prepare_model_for_kbit_training (fp32 embeddings, lm_head, norms),
               padding to max_length, full-sequence logits: the reference recipe
  ours         summ.training.train() as shipped: frozen weights in the compute dtype, fused GELU /
               norms with a bf16 residual stream, LM head on labelled positions only; `--set`
               adds levers (e.g. model.checkpointed_layers, model.compile_layers)
  ours_stock_modules
               summ.training.train() with transformers' own modules (model.fused_ops=false); its frozen
               weights stay in the compute dtype (the HF Trainer's are fp32), so in bf16 the two
               still differ by that

With dropout on (Phi-2's residual dropout 0.1, LoRA dropout 0.05), the runners draw different
dropout masks, so their curves agree within that noise; `--no-dropout` removes it and leaves the
numerical differences of the levers. Output: JSON, a markdown table and, with matplotlib, a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, TINY_OVERRIDES, TINY_SETS, cap_memory, environment, one_process  # noqa: E402

RUNNERS = ("hf_trainer", "ours", "ours_stock_modules")


def curve_config(args, out_dir: Path, extra: tuple[str, ...] = ()):
    from summ.config import load_config

    overrides = dict(TINY_OVERRIDES["phi2"]) if args.tiny else {}
    if args.no_dropout:
        overrides["resid_pdrop"] = 0.0
    sets = ["model.init=random", f"model.name_or_path={REPO / 'tests/fixtures/phi-2'}",
            f"data.dataset={args.data_xsum}", "data.train_split=train", "data.eval_split=validation",
            f"data.max_train_rows={args.steps * args.micro_batch * args.accumulation}", "data.max_eval_rows=1",
            f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum_steps={args.accumulation}",
            "train.length_grouping=false", f"train.max_steps={args.steps}", f"train.warmup_steps={args.warmup}",
            "train.save_every=100000", "eval.at_start=false", "eval.at_end=false", "eval.eval_every=0",
            "eval.generate=false", f"log.output_dir={out_dir}", "log.trackers=[]", "log.progress_bar=false",
            "model.config_overrides=" + json.dumps(overrides)]
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    if args.no_dropout:
        sets.append("lora.dropout=0.0")
    if args.tiny:
        sets += TINY_SETS
    else:
        sets += [f"train.mixed_precision={args.dtype}",
                 f"quant.compute_dtype={'bfloat16' if args.dtype == 'bf16' else 'float16'}"]
    return load_config(REPO / "configs/xsum.json", sets + list(extra))


def planned_rows(cfg):
    """Our loop's training data (`summ.training.setup_data`) and the rows its steps train, in order:
    what train() plans, and what the HF Trainer is given."""
    from summ.training import remaining_windows, setup_data

    data = setup_data(cfg, one_process())
    order = [i for _, window in remaining_windows(data, cfg.train.epochs, 0, 0, data.total_steps)
             for micro in window for i in micro]
    return data, order


def run_hf_trainer(args) -> list[float]:
    """The HF Trainer recipe's per-step losses (per label token), on our loop's rows in its plan's order."""
    import torch
    from transformers import Trainer, TrainerCallback

    from hf_trainer_peer import padded_collator, peer_model, train_peer
    from summ.precision import resolve_compute_dtype

    with tempfile.TemporaryDirectory() as tmp:
        cfg = curve_config(args, Path(tmp), ("model.fused_ops=false",))
        t = cfg.train
        data, order = planned_rows(cfg)
        on_gpu = torch.cuda.is_available()
        device = torch.device("cuda" if on_gpu else "cpu")
        dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)
        model = peer_model(cfg, device, dtype, adapter_seed=t.seed)
        window: list[list[float]] = [[0.0, 0.0]]  # [loss x label tokens, label tokens] of the open step
        losses: list[float] = []

        class Recording(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss = result[0] if return_outputs else result
                labels = int((inputs["labels"][:, 1:] != -100).sum())
                # With num_items_in_batch the loss is already a sum over the step's label tokens / their count.
                weight = num_items_in_batch if num_items_in_batch is not None else labels
                window[0][0] += float(loss.detach()) * float(weight)
                window[0][1] += labels
                return result

        class CloseStep(TrainerCallback):
            def on_step_end(self, *a, **k):
                total, labels = window[0]
                losses.append(total / labels if labels else float("nan"))
                window[0] = [0.0, 0.0]

        train_peer(model, data.train_examples, order, output_dir=tmp, batch=t.micro_batch_size,
                   accumulation=t.grad_accum_steps, steps=t.max_steps, dtype=dtype,
                   collator=padded_collator(data.tokenizer.pad_token_id, cfg.data.max_length),
                   trainer_class=Recording, callbacks=[CloseStep()], learning_rate=t.lr, lr_scheduler_type="cosine",
                   warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                   optim="paged_adamw_8bit" if on_gpu else "adamw_torch", seed=t.seed)
        return losses


def run_ours(args, runner: str) -> list[float]:
    from summ.training import train

    extra = ("model.fused_ops=false",) if runner == "ours_stock_modules" else tuple(args.overrides)
    if args.tiny:
        extra += ("train.optimizer=adamw",)
    with tempfile.TemporaryDirectory() as tmp:
        return train(curve_config(args, Path(tmp), extra)).train_losses


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for runner, losses in results["losses"].items():
        ax.plot(range(1, len(losses) + 1), losses, label=runner, marker=".")
    ax.set_xlabel(f"optimizer step ({results['rows_per_step']} rows each, same rows for every runner)")
    ax.set_ylabel("train loss per label token")
    ax.set_title(f"Phi-2 (random weights), {'no dropout' if results['no_dropout'] else 'recipe dropout'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-xsum", default=str(REPO / "data" / "xsum_sample"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--seed", type=int, help="train.seed of every runner: the rows' order and the LoRA "
                                                 "initialisation (default: the config's)")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="rows per micro-batch (train.micro_batch_size), every runner")
    parser.add_argument("--accumulation", type=int, default=8,
                        help="micro-batches per optimizer step (train.grad_accum_steps), every runner; "
                             "--micro-batch x --accumulation rows per step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the `ours` runner (a lever whose losses should not move)")
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--cap-gib", type=float, default=15.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        cap_memory(args.cap_gib)
        losses = run_hf_trainer(args) if args.child == "hf_trainer" else run_ours(args, args.child)
        print("RESULT " + json.dumps(losses), flush=True)
        return 0

    results = {"environment": environment(), "command": " ".join(["python"] + sys.argv),
               "no_dropout": args.no_dropout, "rows_per_step": args.micro_batch * args.accumulation,
               "ours_overrides": args.overrides, "losses": {}, "errors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # The training rows every runner trains (indices of the rows kept, in file order), in order.
        results["row_order"] = planned_rows(curve_config(args, Path(tmp)))[1]
    for runner in args.runners:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", runner],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results["errors"][runner] = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
            print(f"{runner}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results["losses"][runner] = json.loads(lines[-1][len("RESULT "):])

    base = results["losses"].get("hf_trainer")
    env = results["environment"]
    table = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}; {env['date']}.", f"Command: `{results['command']}`", "",
             "| runner | first loss | last loss | mean abs diff vs hf_trainer | max abs diff vs hf_trainer |",
             "|---|---|---|---|---|"]
    for runner, losses in results["losses"].items():
        diffs = [abs(a - b) for a, b in zip(losses, base)] if base else []
        results.setdefault("diff_vs_hf_trainer", {})[runner] = (
            {"mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs)} if diffs else None)
        cols = f"{sum(diffs) / len(diffs):.4f} | {max(diffs):.4f}" if diffs else "| "
        table.append(f"| {runner} | {losses[0]:.4f} | {losses[-1]:.4f} | {cols} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "loss_curves_no_dropout" if args.no_dropout else "loss_curves"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    if plot(results, out / f"{name}.png"):
        print(f"plot: {out / f'{name}.png'}")
    print("\n".join(table))
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
