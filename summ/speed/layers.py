"""Levers on the model's layers: fused elementwise ops, Liger-Kernel, compiled layers, and how many
layers recompute their activations in backward. Each computes the same function as the layers it
changes; only speed and memory differ."""

from __future__ import annotations

import logging

import torch

from summ.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def apply_load_time_levers(model, cfg: RunConfig, device: torch.device) -> None:
    """Fused ops and Liger-Kernel, on the freshly loaded base (before LoRA wraps its modules)."""
    m = cfg.model
    if m.fused_ops:
        fuse_elementwise_ops(model)
    if m.liger_kernel and device.type == "cuda":  # Triton kernels: a CPU (e.g. predict there) runs without
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        # Our fused RMSNorm already replaced transformers' (Liger's would patch a module it does not know).
        _apply_liger_kernel_to_instance(model=model, rope=True, swiglu=True, rms_norm=not m.fused_ops,
                                        cross_entropy=False, fused_linear_cross_entropy=False)


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' checkpointable blocks), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model, for_cuda_graphs: bool = False) -> int:
    """Compile every decoder layer in place (LoRA included), with dynamic shapes so micro-batches of
    new lengths reuse the compiled code. Returns how many were compiled.

    Under CUDA graphs the layers draw dropout masks with torch's own dropout kernel
    (`fallback_random`): a graphed step is GPU-bound, and there the Triton generator's arithmetic
    costs more than the six extra launches per layer (+4% tokens/s on graphed 32-row Phi-2 steps).
    Without graphs the launches are what a step waits for, so inductor keeps its own generator."""
    layers = decoder_layers(model)
    options = {"fallback_random": True} if for_cuda_graphs else {}
    for layer in layers:
        layer.compile(dynamic=True, options=dict(options))
    log.info("compiled %d decoder layers", len(layers))
    return len(layers)


def limit_checkpointing(model, layers: int) -> list[int]:
    """Recompute only `layers` of the decoder layers (spread evenly); the others keep their
    activations. Returns the indices that still recompute."""
    blocks = decoder_layers(model)
    if not blocks:
        raise ConfigError("model.checkpointed_layers: this architecture has no checkpointable decoder layers")
    layers = min(layers, len(blocks))
    chosen = {round(i * len(blocks) / layers) for i in range(layers)} if layers else set()
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index in chosen
    log.info("gradient checkpointing on %d of %d decoder layers", len(chosen), len(blocks))
    return sorted(chosen)


def _keeps_stream_dtype(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # bf16 only: fp16's range is too narrow to carry the residual stream safely, so an fp16 (T4)
    # run keeps autocast's fp32 norms; fp32 weights keep transformers' behaviour.
    return x.dtype == torch.bfloat16 and weight.dtype == x.dtype


class FusedRMSNorm(torch.nn.Module):
    """Llama-style RMSNorm in one kernel (torch's rms_norm), from the module it replaces; it
    returns the input's dtype, as the Python original does."""

    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (hidden_states.shape[-1],)
        if self.weight.dtype == hidden_states.dtype:
            # Autocast would run rms_norm in fp32 and return fp32 (see StreamDtypeLayerNorm).
            with torch.autocast(hidden_states.device.type, enabled=False):
                return torch.nn.functional.rms_norm(hidden_states, shape, self.weight, self.eps)
        # An fp32 weight on a half-precision input: promote like the original does.
        with torch.autocast(hidden_states.device.type, enabled=False):
            normed = torch.nn.functional.rms_norm(hidden_states.float(), shape, None, self.eps)
        return self.weight * normed.to(hidden_states.dtype)


class StreamDtypeLayerNorm(torch.nn.LayerNorm):
    """LayerNorm that returns bf16 for bf16 input under autocast.

    CUDA autocast runs layer_norm in fp32 and returns fp32, which turns a bf16 model's whole
    residual stream fp32 (Phi-2): every 4-bit matmul then casts its input to bf16 and its output
    back, LoRA dropout and the residual adds run in fp32, and each layer's saved activations
    double. The kernel accumulates in fp32 either way; only the output dtype differs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _keeps_stream_dtype(x, self.weight):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# Norms computing x / rms(x) * weight exactly (Gemma's 1 + weight variant is not one of them).
_RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


def fuse_elementwise_ops(model) -> dict[str, int]:
    """Swap transformers' Python GELU-tanh and RMSNorm for torch's fused kernels, and keep
    LayerNorm outputs in bf16 under autocast.

    The Python versions run ~8 elementwise kernels per call over the largest activations
    (Phi-2's 10240-wide MLP), and autograd keeps each intermediate for backward; the fused
    kernels compute the same function in fp32 internally and round once.
    """
    from transformers.activations import NewGELUActivation

    swapped = {"gelu_tanh": 0, "rms_norm": 0, "layer_norm": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped["gelu_tanh"] += 1
            elif type(child).__name__ in _RMSNORM_CLASSES and hasattr(child, "variance_epsilon"):
                setattr(parent, name, FusedRMSNorm(child.weight, child.variance_epsilon))
                swapped["rms_norm"] += 1
            elif type(child) is torch.nn.LayerNorm:
                child.__class__ = StreamDtypeLayerNorm  # same parameters and state-dict keys
                swapped["layer_norm"] += 1
    log.info("fused ops: %s", swapped)
    return swapped
