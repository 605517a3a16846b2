"""Next-token cross-entropy summed over labelled positions, so callers normalise by label tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from summ.data import IGNORE_INDEX


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()


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
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    picked = targets[:, positions]
    keep = (picked != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                   attention_mask=None if mask is None else mask.to(device, non_blocking=True),
                   logits_to_keep=positions.to(device, non_blocking=True)).logits
    logits = logits.flatten(0, 1).index_select(0, keep.to(device, non_blocking=True))
    return F.cross_entropy(logits.float(), picked.flatten()[keep].to(device, non_blocking=True), reduction="sum")
