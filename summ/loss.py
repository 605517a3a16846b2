"""Next-token cross-entropy summed over labelled positions (callers normalise by label tokens), and
the validation loss built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from summ.data import IGNORE_INDEX, collate


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def labelled_positions(targets: torch.Tensor) -> torch.Tensor:
    """Positions (of `targets`, the labels shifted by one) where some row carries a label: where the
    LM head runs."""
    return (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is its tokens followed only by padding (what summ.data.collate builds)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def forward_summed_loss(model, batch: dict[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Forward pass that runs the LM head only where some row of the batch has a label.

    The head is a hidden x vocab matmul per position (Phi-2: 2560 x 51200, 5% of the model's
    FLOPs) and its logits are the largest activation; on XSum about 1 position in 12 carries a
    label, so this skips most of both. Positions are shared across the batch (a union), which
    length grouping keeps tight.

    `batch` may stay in host memory: every index is worked out there and moved to `device`
    (default: the batch's own), because a data-dependent index built on the GPU (nonzero, boolean
    masking) makes the host wait for the GPU once per micro-batch.
    """
    device = batch["input_ids"].device if device is None else device
    mask = batch["attention_mask"]
    if is_right_padded(mask):
        # Under a causal mask a real token never sees the pads after it, and pads carry no label:
        # without the padding mask attention runs as plain causal (flash kernels), same result.
        mask = None
    targets = batch["labels"][:, 1:]
    positions = labelled_positions(targets)
    picked = targets[:, positions]
    keep = (picked != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    packed = {"position_ids": batch["position_ids"].to(device, non_blocking=True)} if "position_ids" in batch else {}
    logits = model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                   attention_mask=None if mask is None else mask.to(device, non_blocking=True),
                   logits_to_keep=positions.to(device, non_blocking=True), **packed).logits
    logits = logits.flatten(0, 1).index_select(0, keep.to(device, non_blocking=True))
    return F.cross_entropy(logits.float(), picked.flatten()[keep].to(device, non_blocking=True), reduction="sum")


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int, accelerator) -> float:
    """Token-weighted mean loss over `examples`, masked as in training (summary + EOS only).

    Training validates with it and evaluation scores with it, so both report the same number.
    """
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
