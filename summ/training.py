"""The training loop: config in, run result out.

`train()` reads top to bottom: check the inputs (data, then the resume point), build the model,
optimizer and schedule, then one optimizer step per accumulation window, with evaluation,
logging and checkpoints on their cadence. Each setup step and each piece of I/O is a named
helper below it. The CLI, the tests and a hyperparameter search all call `train()`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from summ.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from summ.config import ConfigError, RunConfig, TrainConfig
from summ.data import Encoder, Example, RowStats, encode_rows, load_rows, plan_batches, warn_shared_ids
from summ.loss import evaluate_loss
from summ.model import build_model, check_model_settings, count_parameters, load_tokenizer
from summ.optimizer import make_optimizer
from summ.precision import mixed_precision_mode, resolve_compute_dtype
from summ.preemption import StopSignals
from summ.run_lock import hold_run_folder
from summ.rouge import ROUGE_KEYS, score_pairs
from summ.run_record import (RunLog, check_resume, check_trackers, record_resume, save_adapter, write_metrics,
                              write_run_record)
from summ.speed.graphs import check_graph_launch
from summ.speed.step import OutOfMemory, setup_step_runner
from summ.summaries import gather_in_order, generate_summaries

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


class TrainingDiverged(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Preempted(TrainingError):
    """SIGTERM or SIGINT arrived: the run finished its step, saved a checkpoint and stopped."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint {checkpoint}")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    train_losses: list[float] = field(default_factory=list)  # one per optimizer step
    eval_history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resumed run continues exactly."""
    step: int = 0
    epoch: int = 0
    window: int = 0  # the next accumulation window of `epoch`
    train_losses: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)
    skipped_steps: int = 0
    overflow_steps: int = 0  # fp16 steps the loss scaler skipped (counted in skipped_steps too)
    tokens_seen: int = 0
    peak_memory: dict = field(default_factory=dict)
    best: dict | None = None  # with train.keep_best: the step, metric and value of the state adapter/ holds
    bad_steps_in_row: int = 0  # skipped updates since the last applied one

    def advance(self, position_after: tuple[int, int], window_loss: float, applied: bool) -> int:
        """Count a finished optimizer step (its update applied or skipped); returns its number."""
        self.step += 1
        self.epoch, self.window = position_after
        self.train_losses.append(window_loss)
        if applied:
            self.bad_steps_in_row = 0
        return self.step

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        state = cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        if state.best is not None and "metric" not in state.best:  # saved before train.best_metric
            state.best = {"step": state.best["step"], "metric": "val/loss", "value": state.best["val/loss"]}
        return state


@dataclass(frozen=True)
class EpochPlan:
    """This process's accumulation windows (micro-batches of row indices) of each epoch: a pure
    function of the epoch, so a resumed run rebuilds exactly the plan it was following."""
    lengths: list[int]
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    length_grouping: bool
    world: int
    rank: int

    def micro_batches(self, epoch: int) -> list[list[int]]:
        return plan_batches(self.lengths, micro_batch_size=self.micro_batch_size, seed=self.seed, epoch=epoch,
                            length_grouping=self.length_grouping)

    def windows(self, epoch: int) -> list[list[list[int]]]:
        plan = self.micro_batches(epoch)
        # Every rank takes the same number of micro-batches (each gradient sync waits for all).
        per_rank = len(plan) // self.world
        mine = plan[self.rank::self.world][:per_rank]
        return [mine[s:s + self.grad_accum_steps] for s in range(0, per_rank, self.grad_accum_steps)]


@dataclass
class TrainData:
    tokenizer: object
    encoder: Encoder
    train_examples: list[Example]
    eval_examples: list[Example]
    rouge_rows: list[dict]  # the validation rows summarized at each validation (eval.validation_rouge_rows)
    stats: dict[str, RowStats]
    fingerprint: str  # of the tokenized training examples: a resume must see the same data
    plan: EpochPlan
    total_steps: int


def train(cfg: RunConfig, resume: bool | str | Path = False, *, accept_changes: bool = False,
          on_validation: Callable[[int, dict], None] | None = None) -> RunResult:
    """Fine-tune as `cfg` says, into log.output_dir. `on_validation(step, record)` is called after
    each validation (a search reports it to its scheduler)."""
    from accelerate.utils import set_seed

    t = cfg.train
    run_dir = Path(cfg.log.output_dir)
    resume_from = resume_point(run_dir, resume)
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(t.seed)

    # Inputs first, before any folder is made or model loaded: bad input fails in seconds.
    data = setup_data(cfg, accelerator)
    check_model_settings(cfg)
    check_trackers(cfg)
    changes = check_resume(cfg, resume_from, accelerator.num_processes, data.fingerprint, accept_changes)
    if accelerator.is_main_process:
        hold_run_folder(run_dir, "training")
    write_run_record(cfg, run_dir, accelerator, data.tokenizer, resuming=resume_from is not None)

    model, optimizer, scheduler = setup_model(cfg, accelerator, data.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    runner = setup_step_runner(model, cfg, accelerator, data.train_examples, data.plan.lengths, data.tokenizer.pad_token_id)
    state = load_state(cfg, run_dir, accelerator, resume_from, changes, model, optimizer, scheduler)
    run_log = RunLog(accelerator, cfg, run_dir, resumed_at=state.step if resume_from is not None else None)
    validate = Validation(model, data, cfg, accelerator, run_log, state, on_validation)
    checkpoint_record = {"config": cfg.to_dict(), "world_size": accelerator.num_processes,
                         "data_fingerprint": data.fingerprint}

    if state.step == 0 and cfg.eval.at_start:
        validate(0)
    progress = _progress(accelerator, cfg, data.total_steps, state.step)
    _reset_peak_memory(release_cache=True)
    steps = list(remaining_windows(data, t.epochs, state.epoch, state.window, data.total_steps - state.step))
    runner.record_graphs(window for _, window in steps)
    throughput = Throughput(accelerator)
    with StopSignals() as stop:
        for position_after, window in steps:
            # forward and backward over the window, the loss normalised by its label tokens (queued, not waited for)
            model.train()
            loss_sum, n_labels, tokens = runner.forward_backward(window)
            throughput.add(tokens)

            # clip (this also unscales fp16 gradients), step unless anything is non-finite, schedule
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            applied, window_loss, grad_norm = optimizer_step(accelerator, optimizer, loss_sum, n_labels, grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=not runner.keeps_grad_tensors)
            step = state.advance(position_after, window_loss, applied)
            progress.update(1)
            if not applied:
                count_bad_step(state, window_loss, grad_norm, t, run_log, accelerator, run_dir)

            if step % cfg.log.log_every == 0 or step == data.total_steps:
                tokens, seconds = throughput.take()  # over all processes
                state.tokens_seen += tokens
                logged = train_log_record(state, cfg.log.log_every, scheduler.get_last_lr()[0], grad_norm, tokens,
                                          seconds)
                run_log.write(step, logged)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")

            if (cfg.eval.eval_every and step % cfg.eval.eval_every == 0) or (step == data.total_steps
                                                                             and cfg.eval.at_end):
                validate(step)
                throughput.restart()  # evaluation time is not training throughput

            # checkpoint on schedule, or after a stop signal: this step is done, then the run stops
            received = stop.agreed(accelerator)
            if received or step % t.save_every == 0 or step == data.total_steps:
                save_checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, asdict(state),
                                checkpoint_record, t.keep_last)
            if received:
                raise Preempted(received, step, latest_checkpoint(run_dir))
    progress.close()
    return finish_run(model, data, cfg, accelerator, state, runner.metrics(), run_log)


# ----------------------------------------------------------------------------- the step


def read_back(loss_sum: torch.Tensor, n_labels: int, grad_norm: torch.Tensor) -> tuple[float, float]:
    """The window's mean loss per label token and its gradient norm, on the host (one wait for the GPU)."""
    loss, norm = torch.stack([loss_sum.float(), torch.as_tensor(grad_norm, device=loss_sum.device).float()]).tolist()
    return loss / max(n_labels, 1), norm


def optimizer_step(accelerator, optimizer, loss_sum: torch.Tensor, n_labels: int,
                   grad_norm: torch.Tensor) -> tuple[bool, float, float]:
    """Read the window's loss and gradient norm back, and apply the update unless either is not
    finite; returns (applied, mean loss per label token, gradient norm).

    With fp16 the loss scaler must see every step, skipped or not: clipping has already unscaled the
    gradients, and without `update()` the next window's unscale raises.
    """
    window_loss, norm = read_back(loss_sum, n_labels, grad_norm)
    if math.isfinite(window_loss) and math.isfinite(norm):
        optimizer.step()  # with fp16: the scaler's step and update
        return not accelerator.optimizer_step_was_skipped, window_loss, norm
    if accelerator.scaler is not None:
        accelerator.scaler.update()  # found inf: lowers the scale
    return False, window_loss, norm


def count_bad_step(state: TrainState, window_loss: float, grad_norm: float, t: TrainConfig, run_log: RunLog,
                   accelerator, run_dir: Path) -> None:
    """A step whose update was skipped: counted and logged; too many in a row stop the run."""
    state.bad_steps_in_row += 1
    state.skipped_steps += 1
    state.overflow_steps += math.isfinite(window_loss) and accelerator.scaler is not None
    run_log.write(state.step, {"train/skipped_step": 1, "train/loss_this_step": window_loss,
                               "train/grad_norm_this_step": grad_norm})
    accelerator.print(f"step {state.step}: non-finite loss {window_loss} or grad norm {grad_norm}; "
                      f"update skipped ({state.bad_steps_in_row} in a row)")
    if state.bad_steps_in_row >= t.max_consecutive_bad_steps:
        raise TrainingDiverged(
            f"{state.bad_steps_in_row} optimizer steps in a row had a non-finite loss or gradient (step {state.step}); "
            f"stopping. Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. "
            f"Try a lower train.lr or train.max_grad_norm (train.max_consecutive_bad_steps="
            f"{t.max_consecutive_bad_steps} sets the limit)")


def remaining_windows(data: TrainData, epochs: int, epoch: int, window: int, steps_left: int):
    """((epoch, window) of the step after it, the window) for each of the next `steps_left` optimizer
    steps, from `window` of `epoch` on: the plan is a pure function, so the steps ahead are known."""
    for e in range(epoch, epochs):
        windows = data.plan.windows(e)
        for w in range(window if e == epoch else 0, len(windows)):
            if steps_left == 0:
                return
            steps_left -= 1
            yield ((e, w + 1) if w + 1 < len(windows) else (e + 1, 0)), windows[w]


class Throughput:
    """Non-pad tokens trained since the last log line, over all processes, and the seconds they took."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def restart(self) -> None:
        self.started = time.perf_counter()

    def take(self) -> tuple[int, float]:
        tokens = self.accelerator.reduce(torch.tensor(self.tokens, device=self.accelerator.device), "sum").item()
        seconds = time.perf_counter() - self.started
        self.tokens, self.started = 0, time.perf_counter()
        return tokens, seconds


# ----------------------------------------------------------------------------- setup


def make_accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision_mode(cfg.train.mixed_precision), project_dir=str(run_dir))
    check_launch(accelerator.num_processes)
    if cfg.train.cuda_graphs:
        check_graph_launch(accelerator)
    return accelerator


def check_launch(processes: int) -> None:
    """Refuse a launch whose processes would not train as one run: without GPUs, torchrun or
    `accelerate launch --multi_gpu` start ranks that each set up a run of their own unless
    ACCELERATE_USE_CPU is set, and `accelerate launch --cpu --num_processes N` starts one process."""
    how = ("for N CPU processes run ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N run.py ... "
           "(or ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N run.py ...)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes:
        raise ConfigError(f"{launched} processes were launched (WORLD_SIZE) but accelerate set up {processes}; {how}")
    if processes == 1 and "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
            "1", "true", "yes"):
        raise ConfigError(f"`accelerate launch --cpu --num_processes N` starts one process (accelerate starts "
                          f"several CPU processes only through mpirun); {how}")


def setup_data(cfg: RunConfig, accelerator) -> TrainData:
    """Read and tokenize both splits and plan every epoch's batches; touches no model and no folder."""
    t, d = cfg.train, cfg.data
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, d)
    train_rows, train_stats = load_rows(d, d.train_split, d.max_train_rows)
    eval_rows, eval_stats = load_rows(d, d.eval_split, d.max_eval_rows)
    warn_shared_ids(train_rows, eval_rows, d)
    train_examples = encode_rows(encoder, train_rows, d.train_split)
    eval_examples = encode_rows(encoder, eval_rows, d.eval_split)
    lengths = [len(e.input_ids) for e in train_examples]
    plan = EpochPlan(lengths, t.micro_batch_size, t.grad_accum_steps, t.seed, t.length_grouping,
                     accelerator.num_processes, accelerator.process_index)
    check_even_split(plan, t.epochs, len(train_examples))
    steps_per_epoch = [len(plan.windows(e)) for e in range(t.epochs)]
    total_steps = sum(steps_per_epoch) if t.max_steps is None else min(t.max_steps, sum(steps_per_epoch))
    if t.warmup_steps > total_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds the run's {total_steps} optimizer steps")
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        accelerator.print(f"{name} rows: {stats.read} read, {stats.kept} used, {stats.n_skipped} skipped"
                          + (f" {stats.skipped}" if stats.skipped else ""))
    log.info("%d optimizer steps (%s per epoch)", total_steps, steps_per_epoch)
    return TrainData(tokenizer=tokenizer, encoder=encoder, train_examples=train_examples, eval_examples=eval_examples,
                     rouge_rows=eval_rows[:cfg.eval.validation_rouge_rows],
                     stats={"train": train_stats, "eval": eval_stats},
                     fingerprint=examples_fingerprint(train_examples), plan=plan, total_steps=total_steps)


def check_even_split(plan: EpochPlan, epochs: int, rows: int) -> None:
    """Every process needs a micro-batch; say which micro-batches an uneven split leaves out."""
    for epoch in range(epochs):
        planned = len(plan.micro_batches(epoch))
        if planned < plan.world:
            raise ConfigError(f"data: {rows} training rows make {planned} micro-batches, fewer than the "
                              f"{plan.world} processes")
        if planned % plan.world:
            log.warning("epoch %d: the last %d of %d micro-batches are not trained: %d processes share the plan "
                        "evenly (a multiple of %d micro-batches avoids it)", epoch, planned % plan.world, planned,
                        plan.world, plan.world)


def examples_fingerprint(examples: list[Example]) -> str:
    """A hash of the tokenized training rows: changes with the data, template, tokenizer or length."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(array("q", e.input_ids).tobytes())
        digest.update(array("q", e.labels).tobytes())
    return f"{len(examples)}:{digest.hexdigest()[:16]}"


def setup_model(cfg: RunConfig, accelerator, total_steps: int):
    """4-bit base + LoRA, AdamW over the adapters, the learning-rate schedule; prepared by accelerate."""
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, accelerator.device)
    with accelerator.main_process_first():  # the first process builds any cached weights
        model = build_model(cfg, accelerator.device, compute_dtype)
    trainable, total = count_parameters(model)
    accelerator.print(f"parameters: {total:,} total, {trainable:,} trainable")
    optimizer = make_optimizer(model, cfg.train, accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def make_scheduler(optimizer, t: TrainConfig, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if t.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    make = get_cosine_schedule_with_warmup if t.lr_scheduler == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, t.warmup_steps, total_steps)


def use_new_optimizer_settings(optimizer, scheduler, t: TrainConfig) -> None:
    """After a resume with accepted changes: the optimizer and schedule states loaded from the checkpoint
    carry the old learning rate, betas, eps and weight decay; put the config's values in their place."""
    for group in optimizer.param_groups:
        group.update(initial_lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                     weight_decay=t.weight_decay if group.get("decayed", group["weight_decay"] > 0) else 0.0)
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = t.lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_state(cfg: RunConfig, run_dir: Path, accelerator, resume_from: Path | None, changes: dict, model,
               optimizer, scheduler) -> TrainState:
    """A fresh state, or the checkpoint's (with model, optimizer and schedule loaded in place)."""
    if resume_from is None:
        return TrainState()
    state = TrainState.from_dict(load_checkpoint(accelerator, resume_from, model, optimizer, scheduler))
    if changes.get("forced"):
        use_new_optimizer_settings(optimizer, scheduler, cfg.train)
    record_resume(cfg, run_dir, accelerator, resume_from, state.step, changes)
    accelerator.print(f"resumed from {resume_from} at step {state.step}")
    return state


def resume_point(run_dir: Path, resume: bool | str | Path) -> Path | None:
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


# ----------------------------------------------------------------------------- evaluation and logging


class Validation:
    """Validation loss (and ROUGE, with eval.validation_rouge_rows) at a step: logged, checked finite,
    kept as the best state (train.keep_best) and reported to `on_validation`."""

    def __init__(self, model, data: TrainData, cfg: RunConfig, accelerator, run_log: RunLog, state: TrainState,
                 on_validation: Callable[[int, dict], None] | None):
        self.model, self.data, self.cfg, self.accelerator = model, data, cfg, accelerator
        self.run_log, self.state, self.on_validation = run_log, state, on_validation

    def __call__(self, step: int) -> None:
        record = run_validation(self.model, self.data, self.cfg, self.accelerator)
        if self.data.rouge_rows:
            record.update(validation_rouge(self.model, self.data, self.cfg, self.accelerator))
        self.state.eval_history.append({"step": step, **record})
        self.run_log.write(step, record)
        run_dir = Path(self.cfg.log.output_dir)
        if not math.isfinite(record["val/loss"]):  # finite gradients can still carry the weights off
            raise TrainingDiverged(
                f"validation loss is {record['val/loss']} at step {step}; stopping before this state is saved. "
                f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. Try a lower train.lr "
                f"(now {self.cfg.train.lr:g})")
        rouge = (", ROUGE-1/2/L/Lsum " + "/".join(f"{record['val/' + k]:.2f}" for k in ROUGE_KEYS)
                 + f" on {len(self.data.rouge_rows)} articles") if self.data.rouge_rows else ""
        self.accelerator.print(f"step {step}: val loss {record['val/loss']:.4f}, "
                               f"perplexity {record['val/perplexity']:.2f}{rouge}")
        metric = self.cfg.train.best_metric
        if self.cfg.train.keep_best and improves(record[metric], metric, self.state.best):
            self.state.best = {"step": step, "metric": metric, "value": record[metric]}
            if self.accelerator.is_main_process:
                save_adapter(self.accelerator.unwrap_model(self.model), self.data.tokenizer, self.cfg, run_dir)
        if self.on_validation is not None:
            self.on_validation(step, record)


def improves(value: float, metric: str, best: dict | None) -> bool:
    """Whether a validation's `metric` beats the kept best: a lower loss, a higher ROUGE; a tie keeps
    the earlier state, and a best kept by another metric (changed at a resume) is replaced."""
    if best is None or best["metric"] != metric:
        return True
    return value < best["value"] if metric == "val/loss" else value > best["value"]


def validation_rouge(model, data: TrainData, cfg: RunConfig, accelerator) -> dict:
    """Mean ROUGE (in percent) of the summaries the model writes now for data.rouge_rows, with the run's
    decoding; each process writes its share. The decode step stays eager: the model is still training."""
    rows = data.rouge_rows
    mine = range(accelerator.process_index, len(rows), accelerator.num_processes)
    with accelerator.autocast():
        generations, _ = generate_summaries(accelerator.unwrap_model(model), data.tokenizer, data.encoder,
                                            [rows[i]["article"] for i in mine], cfg.eval, accelerator.device,
                                            may_compile=False)
    generations = gather_in_order(accelerator, list(mine), generations, len(rows))
    scores = score_pairs([g.text for g in generations], [r["summary"] for r in rows])
    return {f"val/{key}": sum(s[key] for s in scores) / len(scores) for key in ROUGE_KEYS}


def run_validation(model, data: TrainData, cfg: RunConfig, accelerator) -> dict:
    # The bare model: DDP's forward broadcasts buffers, a collective that a rank without an
    # evaluation batch never joins.
    try:
        val_loss = evaluate_loss(accelerator.unwrap_model(model), data.eval_examples, cfg.eval.batch_size,
                                 data.tokenizer.pad_token_id, accelerator)
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"out of GPU memory in validation at eval.batch_size={cfg.eval.batch_size} rows of up "
                            f"to data.max_length={cfg.data.max_length} tokens; lower eval.batch_size") from None
    record = {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))}
    record.update({k.replace("memory/", "val/"): v for k, v in _memory_stats().items()})
    _reset_peak_memory()  # so training logs report training memory only
    return record


def train_log_record(state: TrainState, log_every: int, lr: float, grad_norm: float, tokens: int,
                     elapsed: float) -> dict:
    """The training line of log.jsonl / TensorBoard; the loss is the mean of the steps that ran."""
    recent = [x for x in state.train_losses[-log_every:] if math.isfinite(x)]
    record = {"train/loss": sum(recent) / len(recent) if recent else float("nan"), "train/lr": lr,
              "train/grad_norm": grad_norm, "train/tokens_per_s": tokens / elapsed, "train/tokens": tokens,
              "train/seconds": elapsed, "train/skipped_steps": state.skipped_steps}
    memory = _memory_stats()
    for key, value in memory.items():
        state.peak_memory[key] = max(state.peak_memory.get(key, 0.0), value)
    return {**record, **memory}


def finish_run(model, data: TrainData, cfg: RunConfig, accelerator, state: TrainState, speed: dict,
               run_log: RunLog) -> RunResult:
    """metrics.json and, unless train.keep_best kept one already, the last state as adapter/."""
    run_dir = Path(cfg.log.output_dir)
    metrics = {**final_metrics(state, data, count_parameters(model)), **speed}
    if accelerator.is_main_process:
        if state.best is None:  # without train.keep_best (or no validation ran): the last state
            save_adapter(accelerator.unwrap_model(model), data.tokenizer, cfg, run_dir)
        write_metrics(run_dir, metrics)
    accelerator.wait_for_everyone()  # adapter/ is whole before any rank evaluates it
    run_log.finish()  # not accelerator.end_training(): it ends the process group the evaluation needs
    return RunResult(run_dir=run_dir, steps=state.step, train_losses=state.train_losses,
                     eval_history=state.eval_history, metrics=metrics)


def final_metrics(state: TrainState, data: TrainData, params: tuple[int, int]) -> dict:
    """metrics.json. The training loss is the last optimizer step's alone (log.jsonl's `train/loss` is
    the mean over log.log_every steps); the last validation names its step and rows."""
    last_eval = state.eval_history[-1] if state.eval_history else {}
    return {
        "steps": state.step, "total_steps": data.total_steps,
        "last_step_train_loss": state.train_losses[-1] if state.train_losses else None,
        "final_val_loss": last_eval.get("val/loss"), "final_val_perplexity": last_eval.get("val/perplexity"),
        "final_val_step": last_eval.get("step"), "final_val_rows": data.stats["eval"].kept,
        "eval_history": state.eval_history, "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps, "tokens_seen": state.tokens_seen,
        "adapter_step": state.best["step"] if state.best else state.step,
        "best_validation": state.best,  # with train.keep_best: the step, metric and value adapter/ holds
        "trainable_params": params[0], "total_params": params[1],
        "data": {name: stats.summary() for name, stats in data.stats.items()},
        # Peak GPU memory while training (evaluation peaks are in eval_history).
        **state.peak_memory,
    }


def _memory_stats() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _reset_peak_memory(release_cache: bool = False) -> None:
    if torch.cuda.is_available():
        if release_cache:
            # Loading staged full-precision weights through the caching allocator; give those blocks
            # back so reserved memory reports what training needs.
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _progress(accelerator, cfg: RunConfig, total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.log.progress_bar and accelerator.is_local_main_process))
