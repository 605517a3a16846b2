"""The optimizer: AdamW over the LoRA parameters, torch's fused kernel or bitsandbytes' 8-bit states.

bitsandbytes (up to at least 0.50) waits for the whole GPU after every parameter tensor's update:
256 `torch.cuda.synchronize()` calls per step for the Phi-2 recipe's LoRA, each a round trip that
leaves the GPU idle while Python launches the next update. Those waits order the updates after the
prefetch of paged (managed-memory) state. bitsandbytes pages only tensors of at least 100,000
elements, so a LoRA's states usually live in plain device memory. Then the update kernels, which
bitsandbytes launches on the default stream, are ordered after the backward pass by the stream alone.
`StreamOrderedSteps` skips the waits in exactly that case and steps as bitsandbytes does otherwise.
"""

from __future__ import annotations

from functools import cache

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
    # Paging moves optimizer state to host memory under GPU memory pressure; a CPU has nothing to page.
    paged = t.optimizer == "paged_adamw_8bit" and device.type == "cuda"
    return stream_ordered_adamw_8bit(paged)(groups, **kwargs)


@cache
def stream_ordered_adamw_8bit(paged: bool) -> type:
    """bitsandbytes' (Paged)AdamW8bit with `StreamOrderedSteps`: same states, same updates."""
    import bitsandbytes as bnb

    base = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return type(f"StreamOrdered{base.__name__}", (StreamOrderedSteps, base), {})


class StreamOrderedSteps:
    """Mixin for a bitsandbytes optimizer: steps without a device-wide wait per parameter tensor when
    no state is paged and the step runs on the default stream (where bitsandbytes launches its
    kernels). A first step, which creates the states, and any other case run bitsandbytes' own step."""

    @torch.no_grad()
    def step(self, closure=None):
        if not self._stream_ordered():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # bitsandbytes' loop without its `sync_gpu(p)` after each update.
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None:
                    self.update_step(group, p, gindex, pindex)
        return loss

    def _stream_ordered(self) -> bool:
        if not self.initialized:
            return False
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(len(self.state[p]) == 0 for p in params):
            return False  # a parameter's first step: bitsandbytes creates (and maybe pages) its state
        if any(getattr(self.state[p]["state1"], "is_paged", False) for p in params):
            return False
        devices = {p.device for p in params}
        return all(d.type == "cpu" or (d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d))
                   for d in devices)
