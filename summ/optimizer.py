"""The optimizer: AdamW over the LoRA parameters, bitsandbytes' (paged) 8-bit states or torch's fused kernel."""

from __future__ import annotations

import torch

from summ.config import TrainConfig


def make_optimizer(model, t: TrainConfig, device: torch.device):
    """AdamW over the trainable (LoRA) parameters; biases and norms get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "bias" in name or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay, "decayed": True},
                          {"params": no_decay, "weight_decay": 0.0, "decayed": False}) if g["params"]]
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if t.optimizer == "adamw":
        # fused: one kernel for every adapter tensor on a GPU instead of a launch per tensor per op.
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)
    import bitsandbytes as bnb

    # Paging moves optimizer state to host memory under GPU memory pressure; a CPU has nothing to page.
    paged = t.optimizer == "paged_adamw_8bit" and device.type == "cuda"
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(groups, **kwargs)
