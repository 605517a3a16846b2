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

import inspect
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
    cls = type(f"StreamOrdered{base.__name__}", (StreamOrderedSteps, base), {"__module__": __name__})
    globals()[cls.__name__] = cls  # so that pickle finds the class by its name
    return cls


class StreamOrderedSteps:
    """Mixin for a bitsandbytes optimizer: steps without a device-wide wait per parameter tensor when
    no state is paged and the step runs on the default stream (where bitsandbytes launches its
    kernels). A first step, which creates the states, and any other case run bitsandbytes' own step."""

    @torch.no_grad()
    def step(self, closure=None):
        if not self._stream_ordered():
            # torch wraps each optimizer class's `step` with the step hooks once the class is used;
            # calling bitsandbytes' wrapped step from this (wrapped) one would run them twice.
            return inspect.unwrap(super().step.__func__)(self, closure)
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
        return ordered_by_stream(params + [self.state[p]["state1"] for p in params])


def ordered_by_stream(tensors: list[torch.Tensor]) -> bool:
    """Whether work on `tensors` is ordered by the stream alone: none is paged (managed memory that
    bitsandbytes prefetches apart from the stream), and each lives on a CPU or on a GPU whose current
    stream is its default one, where bitsandbytes launches its kernels."""
    if any(getattr(t, "is_paged", False) for t in tensors):
        return False
    return all(d.type == "cpu" or (d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d))
               for d in {t.device for t in tensors})


class StepUndo:
    """Device copies of the trainable parameters and the optimizer's state, taken just before a step
    that is queued ahead of its finiteness check, so that a non-finite step can be undone bit for bit.

    Ready once every parameter has its state (after its first step), when no state is paged (host
    memory that the GPU pages in) and the step runs on the default stream, where bitsandbytes
    launches its kernels: the copies are then ordered before and after the update by the stream.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.live: list[torch.Tensor] = []  # what the last `save` copied
        self.copies: list[torch.Tensor] = []
        self.scalars: list[tuple[dict, str, object]] = []

    def ready(self) -> bool:
        # bitsandbytes moves its state to the GPU inside its first step after a load (`initialized`):
        # copies taken before would miss the moved tensors.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
        live = self._live_tensors()
        return getattr(inner, "initialized", True) and live is not None and ordered_by_stream(live)

    @torch.no_grad()
    def save(self) -> None:
        self.live = self._live_tensors()
        if [(c.shape, c.dtype, c.device) for c in self.copies] != [(t.shape, t.dtype, t.device) for t in self.live]:
            self.copies = [torch.empty_like(t) for t in self.live]
        torch._foreach_copy_(self.copies, self.live)
        self.scalars = [(state, key, value) for state in self._states() for key, value in state.items()
                        if not torch.is_tensor(value)]  # bitsandbytes counts steps in a Python int

    @torch.no_grad()
    def restore(self) -> None:
        """Puts back what the last `save` copied."""
        torch._foreach_copy_(self.live, self.copies)
        for state, key, value in self.scalars:
            state[key] = value

    def _states(self) -> list[dict]:
        return [self.optimizer.state.get(p) for group in self.optimizer.param_groups for p in group["params"]]

    def _live_tensors(self) -> list[torch.Tensor] | None:
        """Parameters, then every state tensor once (bitsandbytes shares its quantization maps)."""
        states = self._states()
        if not all(states):
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        unique = {id(t): t for t in params}
        unique.update((id(v), v) for state in states for v in state.values() if torch.is_tensor(v))
        return list(unique.values())
