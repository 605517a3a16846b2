"""One optimizer step's forward and backward, through the levers the config turns on.

The loop hands `StepRunner.forward_backward` an accumulation window (micro-batches of row indices)
and gets back the window's loss summed over its label tokens. How the rows run (as planned,
regrouped by a token budget, packed, or replayed through CUDA graphs) changes speed and memory,
never the gradient: the loss is normalised over the whole window.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext

import torch

from summ.config import RunConfig
from summ.data import Example, collate, collate_packed, padded_length, split_by_tokens
from summ.loss import count_label_tokens, forward_summed_loss
from summ.speed.graphs import GraphedMicroSteps, LENGTH_MULTIPLE
from summ.speed.micro_batch import MicroBatching, choose_micro_batching


class OutOfMemory(RuntimeError):
    """A micro-batch did not fit the GPU; the message names it and the settings that shrink it."""


class StepRunner:
    """Runs the forward and backward of optimizer steps for one model, one config and one set of rows."""

    def __init__(self, model, cfg: RunConfig, accelerator, examples: list[Example], lengths: list[int], pad_id: int,
                 micro_batching: MicroBatching, graphed: GraphedMicroSteps | None = None):
        self.model, self.cfg, self.accelerator = model, cfg, accelerator
        self.examples, self.lengths, self.pad_id = examples, lengths, pad_id
        self.micro_batching, self.graphed = micro_batching, graphed
        self.row_tokens = padded_length(cfg.data.max_length) if cfg.train.packing else None

    @property
    def keeps_grad_tensors(self) -> bool:
        """Whether `.grad` must be zeroed in place: a graph adds into the tensors it recorded."""
        return self.graphed is not None

    def batches(self, window: list[list[int]]) -> list[dict]:
        """A step's rows as the micro-batches that run: as planned, regrouped by the token budget in
        effect, or (CUDA graphs) longest first in groups of the graph's rows, so short rows share
        short graphs; padded, or packed (`train.packing`)."""
        rows = [i for b in window for i in b]
        if self.graphed is not None:
            rows.sort(key=lambda i: -self.lengths[i])
            window = [rows[s:s + self.graphed.rows] for s in range(0, len(rows), self.graphed.rows)]
        elif self.micro_batching.tokens is not None:
            window = split_by_tokens(rows, self.lengths, self.micro_batching.tokens, self.row_tokens)
        if self.row_tokens:
            return [collate_packed([self.examples[i] for i in b], self.row_tokens, self.pad_id) for b in window]
        return [collate([self.examples[i] for i in b], self.pad_id) for b in window]

    def forward_backward(self, window: list[list[int]]) -> tuple[torch.Tensor, int, int]:
        """Queue forward and backward over one accumulation window; returns (its loss summed over
        its label tokens, on the device and not waited for; the label tokens; the non-pad tokens)."""
        batches = self.batches(window)
        with self.out_of_memory_hint(batches):
            return queue_gradients(self.model, batches, self.accelerator, self.graphed)

    def record_graphs(self, windows: Iterable[list[list[int]]]) -> None:
        """Records every graph the windows ahead replay before the first step (the steps are planned
        ahead): a few seconds once, instead of a slow step whenever a new shape first comes up."""
        if self.graphed is None:
            return
        started = time.perf_counter()
        with self.out_of_memory_hint([]):
            recorded = self.graphed.record_ahead(b for window in windows for b in self.batches(window))
        self.accelerator.print(f"CUDA graphs: recorded {recorded} graphs in {time.perf_counter() - started:.1f} s")

    def metrics(self) -> dict:
        m = self.micro_batching
        return {"micro_batch_tokens": m.tokens, "recompute": m.recompute, "recomputed_layers": m.recomputed_layers,
                "decoder_layers": m.layers,
                "cuda_graphs_recorded": len(self.graphed.graphs) if self.graphed is not None else 0,
                "cuda_graphs_record_seconds": self.graphed.record_seconds if self.graphed is not None else 0.0}

    @contextmanager
    def out_of_memory_hint(self, batches: list[dict]):
        """Turn a CUDA out-of-memory into one line naming the largest micro-batch and the knobs that shrink it."""
        try:
            yield
        except torch.OutOfMemoryError:
            shapes = [(self.graphed.rows, self.graphed.length_for(b)) if self.graphed else tuple(b["input_ids"].shape)
                      for b in batches]
            if not shapes:  # recording graphs ahead: the largest graph
                shapes = [(self.graphed.rows, self.graphed.length) if self.graphed else (0, 0)]
            rows, length = max(shapes, key=lambda shape: shape[0] * shape[1])
            t, m = self.cfg.train, self.micro_batching
            knobs = [f"set train.micro_batch_tokens below {m.tokens} (the rows per step stay the same)" if m.tokens
                     else f"lower train.micro_batch_size={t.micro_batch_size} and raise train.grad_accum_steps to "
                          f"keep the rows per step", "lower data.max_length"]
            if m.recomputed_layers < m.layers:
                knobs.append(f"recompute more layers (now {m.recomputed_layers} of {m.layers}: "
                             f"model.gradient_checkpointing=true, model.checkpointed_layers=N)")
            raise OutOfMemory(
                f"out of GPU memory on a micro-batch of {rows} rows x {length} tokens ({rows * length} tokens); "
                f"{', '.join(knobs[:-1])}, or {knobs[-1]}") from None


def setup_step_runner(model, cfg: RunConfig, accelerator, examples: list[Example], lengths: list[int],
                      pad_id: int) -> StepRunner:
    """The micro-batching (the memory probe on a GPU) and, with train.cuda_graphs, the graphs' shape."""
    micro_batching = choose_micro_batching(model, cfg, accelerator)
    if micro_batching is None:
        raise OutOfMemory(
            f"out of GPU memory in the micro-batch probe even for one row of data.max_length={cfg.data.max_length} "
            f"tokens; lower data.max_length, recompute layers (model.gradient_checkpointing=true), or use a GPU "
            f"with more memory")
    t = cfg.train
    accelerator.print(f"rows per optimizer step: {t.micro_batch_size * t.grad_accum_steps} per process, run as "
                      f"{micro_batching.describe()}")
    graphed = None
    if t.cuda_graphs:
        # Micro-batches of as many full-length rows as the token budget holds (at most a step's rows).
        length = padded_length(cfg.data.max_length)
        rows = t.micro_batch_size if micro_batching.tokens is None else micro_batching.tokens // length
        rows = max(1, min(rows, t.micro_batch_size * t.grad_accum_steps))
        accelerator.print(f"CUDA graphs: micro-batches run as {rows} rows x their longest row's length rounded up "
                          f"to {LENGTH_MULTIPLE} tokens (at most {length})")
        graphed = GraphedMicroSteps(model, accelerator, rows, length, pad_id)
    return StepRunner(model, cfg, accelerator, examples, lengths, pad_id, micro_batching, graphed)


def queue_gradients(model, batches: list[dict], accelerator,
                    graphed: GraphedMicroSteps | None = None) -> tuple[torch.Tensor, int, int]:
    """Queue forward and backward over micro-batches; returns (their loss summed over their label
    tokens, on the device; the label tokens; the non-pad tokens) without waiting.

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
