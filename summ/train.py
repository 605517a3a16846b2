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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from summ.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from summ.config import ConfigError, RunConfig, TrainConfig
from summ.data import (Encoder, Example, RowStats, collate, collate_packed, encode_rows, load_rows, padded_length,
                       plan_batches, split_by_tokens, warn_shared_ids)
from summ.graphed_step import GraphedMicroSteps, check_graph_launch
from summ.loss import count_label_tokens, evaluate_loss, forward_summed_loss
from summ.micro_batch import MicroBatching, choose_micro_batching
from summ.model import build_model, check_model_settings, count_parameters, load_tokenizer
from summ.optimizer import StepUndo, make_optimizer
from summ.precision import mixed_precision_mode, resolve_compute_dtype
from summ.preemption import StopSignals
from summ.run_lock import hold_run_folder
from summ.run_record import (RunLog, check_resume, record_resume, save_adapter, write_metrics,
                              write_run_record)

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
    best: dict | None = None  # with train.keep_best: the step and validation loss adapter/ holds

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainData:
    tokenizer: object
    train_examples: list[Example]
    eval_examples: list[Example]
    stats: dict[str, RowStats]
    fingerprint: str  # of the tokenized training examples: a resume must see the same data
    windows_of_epoch: object  # epoch -> this rank's accumulation windows (micro-batches of row indices)
    total_steps: int
    lengths: list[int]  # tokens of each training example


def train(cfg: RunConfig, resume: bool | str | Path = False, *, accept_changes: bool = False,
          on_validation: Callable[[int, dict], None] | None = None) -> RunResult:
    """Fine-tune as `cfg` says, into log.output_dir. `on_validation(step, record)` is called after
    each validation (a search reports it to its scheduler)."""
    from accelerate.utils import set_seed

    t = cfg.train
    run_dir = Path(cfg.log.output_dir)
    resume_from = resume_point(run_dir, resume)
    accelerator = make_accelerator(cfg, run_dir)
    if t.cuda_graphs:
        check_graph_launch(accelerator)
    set_seed(t.seed)

    # Inputs first, before any folder is made or model loaded: bad input fails in seconds.
    data = setup_data(cfg, accelerator)
    check_model_settings(cfg)
    changes = check_resume(cfg, resume_from, accelerator.num_processes, data.fingerprint, accept_changes)
    if accelerator.is_main_process:
        hold_run_folder(run_dir, "training")
    write_run_record(cfg, run_dir, accelerator, data.tokenizer, resuming=resume_from is not None)

    model, optimizer, scheduler = setup_model(cfg, accelerator, data.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    undo = StepUndo(optimizer)
    micro_batching = setup_micro_batching(model, cfg, accelerator)
    graphed = setup_graphed_steps(model, cfg, accelerator, micro_batching, data) if t.cuda_graphs else None
    state = TrainState()
    if resume_from is not None:
        state = TrainState.from_dict(load_checkpoint(accelerator, resume_from, model, optimizer, scheduler))
        if changes.get("forced"):
            use_new_optimizer_settings(optimizer, scheduler, t)
        record_resume(cfg, run_dir, accelerator, resume_from, state.step, changes)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    run_log = RunLog(accelerator, cfg, run_dir, resumed_at=state.step if resume_from is not None else None)
    resume_record = {"config": cfg.to_dict(), "world_size": accelerator.num_processes,
                     "data_fingerprint": data.fingerprint}

    def validate(step: int) -> None:
        record = run_validation(model, data, cfg, accelerator)
        state.eval_history.append({"step": step, **record})
        run_log.write(step, record)
        if not math.isfinite(record["val/loss"]):  # finite gradients can still carry the weights off
            raise TrainingDiverged(
                f"validation loss is {record['val/loss']} at step {step}; stopping before this state is saved. "
                f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. Try a lower train.lr "
                f"(now {t.lr:g})")
        accelerator.print(f"step {step}: val loss {record['val/loss']:.4f}, "
                          f"perplexity {record['val/perplexity']:.2f}")
        if t.keep_best and (state.best is None or record["val/loss"] < state.best["val/loss"]):
            state.best = {"step": step, "val/loss": record["val/loss"]}
            if accelerator.is_main_process:
                save_adapter(accelerator.unwrap_model(model), data.tokenizer, cfg, run_dir)
        if on_validation is not None:
            on_validation(step, record)

    if state.step == 0 and cfg.eval.at_start:
        validate(0)
    progress = _progress(accelerator, cfg, data.total_steps, state.step)
    _reset_peak_memory(release_cache=True)
    if graphed is not None:
        with out_of_memory_hint([(graphed.rows, graphed.length)], cfg, micro_batching):
            record_graphs_ahead(graphed, data, cfg, micro_batching, state, accelerator)
    bad_in_row, tokens_since_log, log_clock = 0, 0, time.perf_counter()
    steps = ((epoch, w, windows, step_batches(windows[w], data, cfg, micro_batching, graphed))
             for epoch, w, windows in remaining_windows(data, t.epochs, state.epoch, state.window,
                                                        data.total_steps - state.step))
    with StopSignals() as stop:
        upcoming = next(steps, None)
        while upcoming is not None:
            epoch, w, windows, batches = upcoming

            # forward and backward over the window, the loss normalised by its label tokens (queued, not waited for)
            model.train()
            with out_of_memory_hint(running_shapes(batches, graphed), cfg, micro_batching):
                loss_sum, n_labels, tokens = queue_gradients(model, batches, accelerator, graphed)
            tokens_since_log += tokens
            upcoming = next(steps, None)  # the next step's micro-batches, built while the GPU runs this one

            # clip (this also unscales fp16 gradients), step unless anything is non-finite, schedule
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            applied, window_loss, grad_norm = optimizer_step(accelerator, optimizer, undo, loss_sum, n_labels, grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=graphed is None)  # a graph adds into the .grad tensors it recorded

            state.step += 1
            state.epoch, state.window = (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)
            state.train_losses.append(window_loss)
            step = state.step
            progress.update(1)

            if applied:
                bad_in_row = 0
            else:
                bad_in_row += 1
                state.skipped_steps += 1
                state.overflow_steps += math.isfinite(window_loss) and accelerator.scaler is not None
                run_log.write(step, {"train/skipped_step": 1, "train/loss_this_step": window_loss,
                                     "train/grad_norm_this_step": grad_norm})
                accelerator.print(f"step {step}: non-finite loss {window_loss} or grad norm {grad_norm}; "
                                  f"update skipped ({bad_in_row} in a row)")
                if bad_in_row >= t.max_consecutive_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient (step {step}); "
                        f"stopping. Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. "
                        f"Try a lower train.lr or train.max_grad_norm (train.max_consecutive_bad_steps="
                        f"{t.max_consecutive_bad_steps} sets the limit)")

            if step % cfg.log.log_every == 0 or step == data.total_steps:
                tokens = accelerator.reduce(torch.tensor(tokens_since_log, device=accelerator.device), "sum").item()
                elapsed = time.perf_counter() - log_clock
                state.tokens_seen += tokens
                logged = train_log_record(state, cfg.log.log_every, scheduler.get_last_lr()[0], grad_norm,
                                          tokens, elapsed)
                run_log.write(step, logged)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")
                tokens_since_log, log_clock = 0, time.perf_counter()

            if (cfg.eval.eval_every and step % cfg.eval.eval_every == 0) or (step == data.total_steps
                                                                             and cfg.eval.at_end):
                validate(step)
                log_clock = time.perf_counter()  # evaluation time is not training throughput

            # checkpoint on schedule, or after a stop signal: this step is done, then the run stops
            received = stop.agreed(accelerator)
            if received or step % t.save_every == 0 or step == data.total_steps:
                save_checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, asdict(state),
                                resume_record, t.keep_last)
            if received:
                raise Preempted(received, step, latest_checkpoint(run_dir))
    progress.close()

    metrics = {**final_metrics(state, data, count_parameters(model)),
               "micro_batch_tokens": micro_batching.tokens, "recompute": micro_batching.recompute,
               "recomputed_layers": micro_batching.recomputed_layers, "decoder_layers": micro_batching.layers,
               "cuda_graphs_recorded": len(graphed.graphs) if graphed is not None else 0,
               "cuda_graphs_record_seconds": graphed.record_seconds if graphed is not None else 0.0}
    if accelerator.is_main_process:
        if state.best is None:  # without train.keep_best (or no validation ran): the last state
            save_adapter(accelerator.unwrap_model(model), data.tokenizer, cfg, run_dir)
        write_metrics(run_dir, metrics)
    accelerator.wait_for_everyone()  # adapter/ is whole before any rank evaluates it
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group the evaluation needs
        tracker.finish()
    return RunResult(run_dir=run_dir, steps=state.step, train_losses=state.train_losses,
                     eval_history=state.eval_history, metrics=metrics)


# ----------------------------------------------------------------------------- the step


def step_batches(window: list[list[int]], data: TrainData, cfg: RunConfig, micro_batching: MicroBatching,
                 graphed: GraphedMicroSteps | None = None) -> list[dict]:
    """One optimizer step's rows as the micro-batches that run: as planned, regrouped by the token
    budget in effect, or (CUDA graphs) longest first in groups of the graph's rows, so short rows
    share short graphs; padded, or packed (`train.packing`). Regrouping leaves the step's gradient
    as it is (the loss is normalised over the whole step)."""
    row_tokens = padded_length(cfg.data.max_length) if cfg.train.packing else None
    rows = [i for b in window for i in b]
    if graphed is not None:
        rows.sort(key=lambda i: -data.lengths[i])
        window = [rows[s:s + graphed.rows] for s in range(0, len(rows), graphed.rows)]
    elif micro_batching.tokens is not None:
        window = split_by_tokens(rows, data.lengths, micro_batching.tokens, row_tokens)
    pad = data.tokenizer.pad_token_id
    return [collate_packed([data.train_examples[i] for i in b], row_tokens, pad) if row_tokens else
            collate([data.train_examples[i] for i in b], pad) for b in window]


def accumulate_gradients(model, batches: list[dict], accelerator,
                         graphed: GraphedMicroSteps | None = None) -> tuple[float, int]:
    """Backward over one accumulation window (through recorded CUDA graphs when `graphed`); returns
    (mean loss per label token, non-pad tokens). The loop queues the same work with
    `queue_gradients` and reads the loss back later."""
    loss_sum, n_labels, tokens = queue_gradients(model, batches, accelerator, graphed)
    return loss_sum.item() / max(n_labels, 1), tokens


def queue_gradients(model, batches: list[dict], accelerator,
                    graphed: GraphedMicroSteps | None = None) -> tuple[torch.Tensor, int, int]:
    """Queue forward and backward over one accumulation window; returns (the window's loss summed
    over its label tokens, on the device; the label tokens; the non-pad tokens) without waiting.

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
        if graphed is not None:  # one process (check_graph_launch): nothing to all-reduce
            loss_sum += graphed.step(batch, world / max(n_labels, 1))
            continue
        # Gradients are all-reduced once per window, on its last micro-batch.
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            summed = forward_summed_loss(model, batch, accelerator.device)
            # DDP averages gradients over ranks; multiplying by `world` turns that into a sum.
            accelerator.backward(summed * world / max(n_labels, 1))
        loss_sum += summed.detach()
    return accelerator.reduce(loss_sum, reduction="sum"), n_labels, tokens


def read_back(loss_sum: torch.Tensor, n_labels: int, grad_norm: torch.Tensor) -> tuple[float, float]:
    """The window's mean loss per label token and its gradient norm, on the host (one wait for the GPU)."""
    loss, norm = torch.stack([loss_sum.float(), torch.as_tensor(grad_norm, device=loss_sum.device).float()]).tolist()
    return loss / max(n_labels, 1), norm


def optimizer_step(accelerator, optimizer, undo: StepUndo, loss_sum: torch.Tensor, n_labels: int,
                   grad_norm: torch.Tensor) -> tuple[bool, float, float]:
    """Apply the update unless the window's loss or gradients are not finite; returns (applied, mean
    loss per label token, gradient norm).

    Without a loss scaler the update is queued before the loss and norm are read back, so Python
    launches the optimizer's kernels while the GPU still runs the backward pass; a non-finite
    window's update is then undone from the copies `undo` took. Its kernels do see the non-finite
    gradients, but all they write is the parameters and `optimizer.state`, which the copies restore.

    With fp16 the loss scaler must see every step, skipped or not: clipping has already unscaled the
    gradients, and without `update()` the next window's unscale raises.
    """
    if accelerator.scaler is None and undo.ready():
        undo.save()
        optimizer.step()
        window_loss, norm = read_back(loss_sum, n_labels, grad_norm)
        if math.isfinite(window_loss) and math.isfinite(norm):
            return True, window_loss, norm
        undo.restore()
        return False, window_loss, norm
    window_loss, norm = read_back(loss_sum, n_labels, grad_norm)
    if math.isfinite(window_loss) and math.isfinite(norm):
        optimizer.step()  # with fp16: the scaler's step and update
        return not accelerator.optimizer_step_was_skipped, window_loss, norm
    if accelerator.scaler is not None:
        accelerator.scaler.update()  # found inf: lowers the scale
    return False, window_loss, norm


def running_shapes(batches: list[dict], graphed: GraphedMicroSteps | None) -> list[tuple[int, int]]:
    """Rows x tokens of each micro-batch as it runs: as collated, or at its graph's shape."""
    if graphed is None:
        return [tuple(b["input_ids"].shape) for b in batches]
    return [(graphed.rows, graphed.length_for(b)) for b in batches]


@contextmanager
def out_of_memory_hint(shapes: list[tuple[int, int]], cfg: RunConfig, micro_batching: MicroBatching):
    """Turn a CUDA out-of-memory into one line naming the largest micro-batch (of `shapes`: rows x
    length) and the knobs that shrink it."""
    try:
        yield
    except torch.OutOfMemoryError:
        rows, length = max(shapes, key=lambda shape: shape[0] * shape[1])
        t = cfg.train
        knobs = [f"set train.micro_batch_tokens below {micro_batching.tokens} (the rows per step stay the same)"
                 if micro_batching.tokens else f"lower train.micro_batch_size={t.micro_batch_size} and raise "
                 f"train.grad_accum_steps to keep the rows per step", "lower data.max_length"]
        if micro_batching.recomputed_layers < micro_batching.layers:
            knobs.append(f"recompute more layers (now {micro_batching.recomputed_layers} of {micro_batching.layers}: "
                         f"model.gradient_checkpointing=true, model.checkpointed_layers=N)")
        raise TrainingError(
            f"out of GPU memory on a micro-batch of {rows} rows x {length} tokens ({rows * length} tokens); "
            f"{', '.join(knobs[:-1])}, or {knobs[-1]}") from None


def setup_graphed_steps(model, cfg: RunConfig, accelerator, micro_batching: MicroBatching,
                        data: TrainData) -> GraphedMicroSteps:
    """Micro-batches of as many full-length rows as the token budget holds (at most a step's rows)."""
    t = cfg.train
    length = padded_length(cfg.data.max_length)
    rows_per_step = t.micro_batch_size * t.grad_accum_steps
    rows = t.micro_batch_size if micro_batching.tokens is None else micro_batching.tokens // length
    rows = max(1, min(rows, rows_per_step))
    accelerator.print(f"CUDA graphs: micro-batches run as {rows} rows x their longest row's length rounded up to "
                      f"{t.graph_length_multiple} tokens (at most {length})")
    return GraphedMicroSteps(model, accelerator, rows, length, data.tokenizer.pad_token_id, t.graph_length_multiple)


def remaining_windows(data: TrainData, epochs: int, epoch: int, window: int, steps_left: int):
    """(epoch, window index, that epoch's windows) for each of the next `steps_left` optimizer steps,
    from `window` of `epoch` on: the plan is a pure function, so the steps ahead are known."""
    for e in range(epoch, epochs):
        windows = data.windows_of_epoch(e)
        for w in range(window if e == epoch else 0, len(windows)):
            if steps_left == 0:
                return
            steps_left -= 1
            yield e, w, windows


def record_graphs_ahead(graphed: GraphedMicroSteps, data: TrainData, cfg: RunConfig, micro_batching: MicroBatching,
                        state: TrainState, accelerator) -> None:
    """Records every graph the rest of the run replays before its first step (the steps are planned
    ahead): a few seconds once, instead of a slow step whenever a new shape first comes up."""
    upcoming = remaining_windows(data, cfg.train.epochs, state.epoch, state.window, data.total_steps - state.step)
    batches = (b for _, w, windows in upcoming for b in step_batches(windows[w], data, cfg, micro_batching, graphed))
    started = time.perf_counter()
    recorded = graphed.record_ahead(batches)
    accelerator.print(f"CUDA graphs: recorded {recorded} graphs in {time.perf_counter() - started:.1f} s")


def setup_micro_batching(model, cfg: RunConfig, accelerator) -> MicroBatching:
    micro_batching = choose_micro_batching(model, cfg, accelerator)
    if micro_batching is None:
        raise TrainingError(
            f"out of GPU memory in the micro-batch probe even for one row of data.max_length={cfg.data.max_length} "
            f"tokens; lower data.max_length, recompute layers (model.gradient_checkpointing=true), or use a GPU "
            f"with more memory")
    accelerator.print(f"rows per optimizer step: {cfg.train.micro_batch_size * cfg.train.grad_accum_steps} per "
                      f"process, run as {micro_batching.describe()}")
    return micro_batching


# ----------------------------------------------------------------------------- setup


def make_accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision_mode(cfg.train.mixed_precision),
                              log_with="tensorboard" if cfg.log.tensorboard else None, project_dir=str(run_dir))
    check_launch(accelerator.num_processes)
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
    world, rank = accelerator.num_processes, accelerator.process_index
    warned: set[int] = set()

    def windows_of_epoch(epoch: int) -> list[list[list[int]]]:
        plan = plan_batches(lengths, micro_batch_size=t.micro_batch_size, seed=t.seed, epoch=epoch,
                            length_grouping=t.length_grouping, shuffle=t.shuffle)
        per_rank = len(plan) // world
        if per_rank == 0:
            raise ConfigError(f"data: {len(train_examples)} training rows make {len(plan)} micro-batches, "
                              f"fewer than the {world} processes")
        if len(plan) % world and epoch not in warned:
            warned.add(epoch)
            # Every rank must take the same number of micro-batches (each gradient sync waits for all).
            log.warning("epoch %d: the last %d of %d micro-batches are not trained: %d processes share the plan "
                        "evenly (a multiple of %d micro-batches avoids it)", epoch, len(plan) % world, len(plan),
                        world, world)
        mine = plan[rank::world][:per_rank]
        return [mine[s:s + t.grad_accum_steps] for s in range(0, per_rank, t.grad_accum_steps)]

    steps_per_epoch = [len(windows_of_epoch(e)) for e in range(t.epochs)]
    total_steps = sum(steps_per_epoch) if t.max_steps is None else min(t.max_steps, sum(steps_per_epoch))
    if t.warmup_steps > total_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds the run's {total_steps} optimizer steps")
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        accelerator.print(f"{name} rows: {stats.read} read, {stats.kept} used, {stats.n_skipped} skipped"
                          + (f" {stats.skipped}" if stats.skipped else ""))
    log.info("%d optimizer steps (%s per epoch)", total_steps, steps_per_epoch)
    return TrainData(tokenizer=tokenizer, train_examples=train_examples, eval_examples=eval_examples,
                     stats={"train": train_stats, "eval": eval_stats},
                     fingerprint=examples_fingerprint(train_examples), windows_of_epoch=windows_of_epoch,
                     total_steps=total_steps, lengths=lengths)


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


def run_validation(model, data: TrainData, cfg: RunConfig, accelerator) -> dict:
    # The bare model: DDP's forward broadcasts buffers, a collective that a rank without an
    # evaluation batch never joins.
    try:
        val_loss = evaluate_loss(accelerator.unwrap_model(model), data.eval_examples, cfg.eval.batch_size,
                                 data.tokenizer.pad_token_id, accelerator)
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory in validation at eval.batch_size={cfg.eval.batch_size} rows of up "
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


def final_metrics(state: TrainState, data: TrainData, params: tuple[int, int]) -> dict:
    last_eval = state.eval_history[-1] if state.eval_history else {}
    return {
        "steps": state.step, "total_steps": data.total_steps,
        "final_train_loss": state.train_losses[-1] if state.train_losses else None,
        "final_val_loss": last_eval.get("val/loss"), "final_val_perplexity": last_eval.get("val/perplexity"),
        "eval_history": state.eval_history, "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps, "tokens_seen": state.tokens_seen,
        "adapter_step": state.best["step"] if state.best else state.step,
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
