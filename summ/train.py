"""The training loop: config in, run result out.

Read it top to bottom: setup, data, model, optimizer, resume, then one optimizer step per
accumulation window. The CLI, the tests and a hyperparameter search all call `train()`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from summ.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from summ.config import ConfigError, RunConfig, TrainConfig
from summ.data import Encoder, collate, encode_rows, load_rows, plan_batches
from summ.loss import count_label_tokens, forward_summed_loss
from summ.model import build_model, count_parameters, load_tokenizer, resolve_compute_dtype

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    train_losses: list[float] = field(default_factory=list)  # one per optimizer step
    eval_history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def train(cfg: RunConfig, resume: bool | str | Path = False) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    run_dir = Path(cfg.log.output_dir)
    resume_from = _resume_point(run_dir, resume)
    accelerator = Accelerator(
        mixed_precision=mixed_precision_mode(t.mixed_precision),
        log_with="tensorboard" if cfg.log.tensorboard else None,
        project_dir=str(run_dir),
    )
    set_seed(t.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")

    # ---- data: read and tokenize everything before the model loads, so bad input fails in seconds
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    train_rows, train_stats = load_rows(cfg.data, cfg.data.train_split, cfg.data.max_train_rows)
    eval_rows, eval_stats = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    train_examples = encode_rows(encoder, train_rows, cfg.data.train_split)
    eval_examples = encode_rows(encoder, eval_rows, cfg.data.eval_split)
    lengths = [len(e.input_ids) for e in train_examples]
    world, rank = accelerator.num_processes, accelerator.process_index  # data is sharded by rank here

    def windows_of_epoch(epoch: int) -> list[list[list[int]]]:
        """This rank's accumulation windows (lists of micro-batches of row indices) for one epoch."""
        plan = plan_batches(lengths, micro_batch_size=t.micro_batch_size, micro_batch_tokens=t.micro_batch_tokens,
                            seed=t.seed, epoch=epoch, length_grouping=t.length_grouping, shuffle=t.shuffle)
        per_rank = len(plan) // world
        if per_rank == 0:
            raise ConfigError(f"data: {len(train_examples)} training rows make {len(plan)} micro-batches, "
                              f"fewer than the {world} processes")
        mine = plan[rank::world][:per_rank]
        return [mine[s:s + t.grad_accum_steps] for s in range(0, per_rank, t.grad_accum_steps)]

    steps_per_epoch = [len(windows_of_epoch(e)) for e in range(t.epochs)]
    total_steps = sum(steps_per_epoch) if t.max_steps is None else min(t.max_steps, sum(steps_per_epoch))
    if t.warmup_steps > total_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds the run's {total_steps} optimizer steps")
    log.info("%d training rows, %d eval rows, %d optimizer steps (%s per epoch)", len(train_examples),
             len(eval_examples), total_steps, steps_per_epoch)

    # ---- model, optimizer, schedule
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, accelerator.device)
    with accelerator.main_process_first():  # the first process builds any cached weights
        model = build_model(cfg, accelerator.device, compute_dtype)
    trainable_params, total_params = count_parameters(model)
    accelerator.print(f"parameters: {total_params:,} total, {trainable_params:,} trainable")
    optimizer = make_optimizer(model, t, accelerator.device)
    scheduler = make_scheduler(optimizer, t, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- resume
    state = {"step": 0, "epoch": 0, "window": 0, "train_losses": [], "eval_history": [],
             "skipped_steps": 0, "overflow_steps": 0, "tokens_seen": 0}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    if cfg.log.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))

    def validate(step: int) -> None:
        val_loss = evaluate_loss(model, eval_examples, cfg.eval.batch_size, tokenizer.pad_token_id, accelerator)
        record = {"step": step, "val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))}
        record.update({k.replace("memory/", "val/"): v for k, v in _memory_stats().items()})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # so training logs report training memory only
        state["eval_history"].append(record)
        _log(accelerator, run_dir, step, {k: v for k, v in record.items() if k != "step"})
        accelerator.print(f"step {step}: val loss {val_loss:.4f}, perplexity {record['val/perplexity']:.2f}")

    # ---- loop
    if state["step"] == 0 and cfg.eval.at_start:
        validate(0)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = _progress(accelerator, cfg, total_steps, state["step"])
    bad_in_row = 0
    tokens_since_log, log_clock = 0, time.perf_counter()
    if torch.cuda.is_available():
        # Loading staged full-precision weights through the caching allocator; give those blocks back
        # so reserved memory reports what training needs.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(state["epoch"], t.epochs):
        windows = windows_of_epoch(epoch)
        first = state["window"] if epoch == state["epoch"] else 0
        for w in range(first, len(windows)):
            if state["step"] >= total_steps:
                break
            batches = [collate([train_examples[i] for i in b], tokenizer.pad_token_id) for b in windows[w]]

            model.train()
            window_loss, tokens = accumulate_gradients(model, batches, accelerator)
            tokens_since_log += tokens

            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            grad_norm = float(grad_norm)
            if math.isfinite(window_loss) and (math.isfinite(grad_norm) or accelerator.scaler is not None):
                optimizer.step()  # with fp16 the scaler skips a step whose gradients overflowed
                if accelerator.optimizer_step_was_skipped:
                    state["overflow_steps"] += 1
                bad_in_row = 0
            else:
                state["skipped_steps"] += 1
                bad_in_row += 1
                accelerator.print(f"step {state['step'] + 1}: non-finite loss {window_loss} or grad norm "
                                  f"{grad_norm}; update skipped ({bad_in_row} in a row)")
                if bad_in_row >= t.max_consecutive_bad_steps:
                    last_ckpt = latest_checkpoint(run_dir)
                    raise TrainingDiverged(
                        f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient (step "
                        f"{state['step'] + 1}); stopping. Last good checkpoint: {last_ckpt or 'none yet'}. "
                        f"Try a lower train.lr or train.max_grad_norm.")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["epoch"], state["window"] = (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)
            state["train_losses"].append(window_loss)
            step = state["step"]
            progress.update(1)

            if step % cfg.log.log_every == 0 or step == total_steps:
                tokens = accelerator.reduce(torch.tensor(tokens_since_log, device=accelerator.device), "sum").item()
                elapsed = time.perf_counter() - log_clock
                state["tokens_seen"] += tokens
                recent = state["train_losses"][-cfg.log.log_every:]
                logged = {"train/loss": sum(recent) / len(recent), "train/lr": scheduler.get_last_lr()[0],
                          "train/grad_norm": grad_norm, "train/tokens_per_s": tokens / elapsed,
                          "train/tokens": tokens, "train/seconds": elapsed,
                          "train/skipped_steps": state["skipped_steps"]}
                logged.update(_memory_stats())
                for key, value in _memory_stats().items():
                    state[key] = max(state.get(key, 0.0), value)
                _log(accelerator, run_dir, step, logged)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")
                tokens_since_log, log_clock = 0, time.perf_counter()

            if (cfg.eval.eval_every and step % cfg.eval.eval_every == 0) or (step == total_steps and cfg.eval.at_end):
                validate(step)
                log_clock = time.perf_counter()  # evaluation time is not training throughput

            if step % t.save_every == 0 or step == total_steps:
                save_checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, state, t.keep_last)
    progress.close()

    # ---- final artifacts
    metrics = {
        "steps": state["step"], "total_steps": total_steps,
        "final_train_loss": state["train_losses"][-1] if state["train_losses"] else None,
        "final_val_loss": state["eval_history"][-1]["val/loss"] if state["eval_history"] else None,
        "final_val_perplexity": state["eval_history"][-1]["val/perplexity"] if state["eval_history"] else None,
        "eval_history": state["eval_history"], "skipped_steps": state["skipped_steps"],
        "overflow_steps": state["overflow_steps"], "tokens_seen": state["tokens_seen"],
        "trainable_params": trainable_params, "total_params": total_params,
        "train_rows": train_stats.kept, "train_rows_skipped": train_stats.skipped,
        "eval_rows": eval_stats.kept, "eval_rows_skipped": eval_stats.skipped,
        # Peak GPU memory while training (evaluation peaks are in eval_history).
        **{k: v for k, v in state.items() if k.startswith("memory/")},
    }
    if accelerator.is_main_process:
        adapter_dir = run_dir / "adapter"
        tmp = run_dir / ".tmp-adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.end_training()
    return RunResult(run_dir=run_dir, steps=state["step"], train_losses=state["train_losses"],
                     eval_history=state["eval_history"], metrics=metrics)


def accumulate_gradients(model, batches: list[dict], accelerator) -> tuple[float, int]:
    """Backward over one accumulation window; returns (mean loss per label token, non-pad tokens).

    The loss is summed over every label token of the window, on all ranks, and divided by their
    count once, so batch 1 x accumulation 8 gives the gradient of batch 8 x accumulation 1 (a mean
    of per-micro-batch means would weight a short summary like a long one).
    """
    world = accelerator.num_processes
    # Counted on the host batches: a count read back from the GPU would stall the launch queue.
    n_labels = int(sum(count_label_tokens(b["labels"]) for b in batches))
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    if world > 1:
        n_labels = int(accelerator.reduce(torch.tensor(n_labels, device=accelerator.device), reduction="sum"))
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        # Gradients are all-reduced once per window, on its last micro-batch.
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            summed = forward_summed_loss(model, batch, accelerator.device)
            # DDP averages gradients over ranks; multiplying by `world` turns that into a sum.
            accelerator.backward(summed * world / max(n_labels, 1))
        loss_sum += summed.detach()
    return accelerator.reduce(loss_sum, reduction="sum").item() / max(n_labels, 1), tokens


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int, accelerator) -> float:
    """Token-weighted mean loss over `examples` (prompt-only masking as in training)."""
    model.eval()
    # Longest first: later, smaller batches reuse the allocator's blocks instead of growing it.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    n_tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for b in batches[accelerator.process_index::accelerator.num_processes]:
        batch = collate([examples[i] for i in b], pad_id)
        loss_sum += forward_summed_loss(model, batch, accelerator.device).double()
        n_tokens += count_label_tokens(batch["labels"])
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    n_tokens = accelerator.reduce(n_tokens, reduction="sum")
    model.train()
    return (loss_sum / n_tokens.clamp(min=1)).item()


def make_optimizer(model, t: TrainConfig, device: torch.device):
    """AdamW over the trainable (LoRA) parameters; biases and norms get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "bias" in name or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    # Paging moves optimizer state to host memory under GPU memory pressure; a CPU has nothing to page.
    if t.optimizer == "paged_adamw_8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    return bnb.optim.AdamW8bit(groups, **kwargs)


def make_scheduler(optimizer, t: TrainConfig, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if t.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    make = get_cosine_schedule_with_warmup if t.lr_scheduler == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, t.warmup_steps, total_steps)


def _resume_point(run_dir: Path, resume: bool | str | Path) -> Path | None:
    if resume is True:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}/checkpoints")
        return found
    if resume:
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (no train_state.json)")
        return path
    if list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, or set "
                              f"log.output_dir to a new folder")
    return None


def mixed_precision_mode(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _memory_stats() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _log(accelerator, run_dir: Path, step: int, values: dict) -> None:
    if accelerator.trackers:
        accelerator.log(values, step=step)
    if accelerator.is_main_process:
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _flat_hparams(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _progress(accelerator, cfg: RunConfig, total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.log.progress_bar and accelerator.is_local_main_process))
