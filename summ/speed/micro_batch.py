"""How an optimizer step's rows run: the token budget of a micro-batch, and the probe that finds it.

The config states the optimization (micro_batch_size x grad_accum_steps rows per step); how those
rows are split into micro-batches changes only speed and memory, because the loop normalises the
step's loss by all of its label tokens. One micro-batch per step is the fastest on a GPU (a small
model at batch 1 is bound by kernel launches, not arithmetic), so the probe tries the whole step
first, recomputing as few decoder layers as it can (none, a quarter, half, three quarters, all:
each recomputed layer costs about a third of its compute, each kept one its activations), and only
then halves the budget until a worst-case micro-batch fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from summ.config import RunConfig
from summ.data import padded_length
from summ.loss import forward_summed_loss
from summ.speed.layers import decoder_layers, limit_checkpointing

log = logging.getLogger(__name__)

# Held during the probe so that the budget it finds leaves room for what training adds later: the
# optimizer state (created at the first step) and allocator fragmentation across shapes.
PROBE_HEADROOM_BYTES = 512 * 2**20


@dataclass(frozen=True)
class MicroBatching:
    tokens: int | None  # budget per micro-batch; None: micro_batch_size rows each, as planned
    recomputed_layers: int  # decoder layers that recompute their activations in backward
    layers: int  # decoder layers in all
    chosen_by: str  # "config", "whole step" (CPU), "probe" or "as stated"

    @property
    def recompute(self) -> bool:
        return self.recomputed_layers > 0

    def describe(self) -> str:
        recompute = (f"recomputing {'all' if self.recomputed_layers == self.layers else self.recomputed_layers} of "
                     f"{self.layers} decoder layers" if self.recompute else "not recomputing layer activations")
        if self.tokens is None:
            return f"micro-batches of train.micro_batch_size rows (train.auto_micro_batch=false), {recompute}"
        how = {"config": "train.micro_batch_tokens", "whole step": "one micro-batch per step",
               "probe": "found by the memory probe"}[self.chosen_by]
        return f"micro-batches of up to {self.tokens} tokens ({how}), {recompute}"


def choose_micro_batching(model, cfg: RunConfig, accelerator) -> MicroBatching | None:
    """The token budget (and, on a GPU under `auto_micro_batch`, how many layers recompute) for this
    run; None when not even one row of max_length fits.

    Runs before the first step: a probe changes no weights and no random state, and leaves no
    gradients behind.
    """
    t, m = cfg.train, cfg.model
    bare = accelerator.unwrap_model(model) if model is not None else None
    layers = len(decoder_layers(bare)) if bare is not None else 0
    stated = 0 if not m.gradient_checkpointing else layers if m.checkpointed_layers is None else \
        min(m.checkpointed_layers, layers)
    if t.micro_batch_tokens is not None:
        return MicroBatching(t.micro_batch_tokens, stated, layers, "config")
    if not t.auto_micro_batch:
        return MicroBatching(None, stated, layers, "as stated")
    row = padded_length(cfg.data.max_length)
    whole_step = t.micro_batch_size * t.grad_accum_steps * row
    if accelerator.device.type != "cuda":
        return MicroBatching(whole_step, stated, layers, "whole step")

    # The whole step recomputing as few layers as fit (when how many was left to us), then halving.
    may_choose_layers = m.gradient_checkpointing and m.checkpointed_layers is None and layers > 0
    fewer = sorted({layers * k // 4 for k in range(4)}) if may_choose_layers else []
    candidates = [(whole_step, n) for n in fewer]
    budget = whole_step
    while True:
        candidates.append((budget, stated))
        if budget <= row:
            break
        budget = max(row, (budget // 2) // row * row)
    chosen = None
    for budget, recomputed in candidates:
        if may_choose_layers:
            limit_checkpointing(bare, recomputed)
        if _fits(bare, budget // row, row, accelerator):
            chosen = (budget, recomputed)
            break
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        # Every rank must run the same micro-batches: the most cautious choice wins (the smallest
        # budget; at equal budgets, the most layers recomputed; nothing, if a rank found nothing).
        choices = gather_object([chosen])
        chosen = None if None in choices else min(choices, key=lambda c: (c[0], -c[1]))
        if may_choose_layers:
            limit_checkpointing(bare, layers if chosen is None else chosen[1])
    if chosen is None:
        return None
    return MicroBatching(chosen[0], chosen[1], layers, "probe")


def _fits(model, rows: int, length: int, accelerator) -> bool:
    """One forward and backward of the worst micro-batch at this budget: `rows` full rows, every
    position labelled (the LM head's largest case)."""
    device = accelerator.device
    on_gpu = device.type == "cuda"
    vocab = model.get_input_embeddings().num_embeddings
    was_training = model.training
    if on_gpu:
        torch.cuda.empty_cache()
    fits = True
    headroom = ids = batch = loss = None
    with torch.random.fork_rng(devices=[device] if on_gpu else []):
        try:
            headroom = torch.empty(PROBE_HEADROOM_BYTES if on_gpu else 0, dtype=torch.uint8, device=device)
            ids = torch.randint(0, vocab, (rows, length))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            model.train()
            with accelerator.autocast():
                loss = forward_summed_loss(model, batch, device)
            loss.backward()
            if on_gpu:
                torch.cuda.synchronize(device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            # cuBLAS and some kernels report a failed allocation as a plain RuntimeError.
            if not isinstance(e, torch.OutOfMemoryError) and not _is_allocation_failure(e):
                raise
            fits = False
        finally:
            headroom = ids = batch = loss = None  # the graph of a failed backward too, before empty_cache
            model.train(was_training)
    model.zero_grad(set_to_none=True)
    if on_gpu:
        torch.cuda.empty_cache()
    log.info("micro-batch probe: %d rows x %d tokens %s", rows, length, "fits" if fits else "out of memory")
    return fits


def _is_allocation_failure(error: RuntimeError) -> bool:
    text = str(error)
    return "out of memory" in text or "ALLOC_FAILED" in text
