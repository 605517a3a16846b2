"""Tokenizer and model: 4-bit NF4 (double quant) base + LoRA adapters, ready to train."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from summ.config import ConfigError, RunConfig
from summ.sources import pretrained_folder, random_folder, resolve_folder
from summ.speed.layers import apply_load_time_levers, compile_decoder_layers, limit_checkpointing

log = logging.getLogger(__name__)

# The attention (and, for Phi, attention output) projections, as in the reference recipes.
DEFAULT_LORA_TARGETS = {
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
}


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    m = cfg.model
    if m.tokenizer is not None:
        source = resolve_folder(m.tokenizer)
    elif m.gguf_file is not None:
        source = pretrained_folder(m)
    else:
        source = resolve_folder(m.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Safe because labels are masked by position, not by token id (see summ.data).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def lora_targets(cfg: RunConfig, model_type: str) -> tuple[str, ...]:
    if cfg.lora.target_modules is not None:
        return cfg.lora.target_modules
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ConfigError(f"lora.target_modules: no default for model type '{model_type}'; "
                          f"list the module names (defaults exist for {sorted(DEFAULT_LORA_TARGETS)})")
    return DEFAULT_LORA_TARGETS[model_type]


def peft_lora_config(cfg: RunConfig, model_type: str):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(lora_targets(cfg, model_type)), bias="none", task_type="CAUSAL_LM")


def load_base_model(cfg: RunConfig, device: torch.device, compute_dtype: torch.dtype, quantize: bool | None = None):
    """The base model (real or random weights), in 4-bit when `quantize` (default: quant.enabled)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m, q = cfg.model, cfg.quant
    quantize = q.enabled if quantize is None else quantize
    # Random weights are built in bf16 for any half-precision run, so fp16 and bf16 runs start equal.
    build_dtype = torch.float32 if compute_dtype == torch.float32 else torch.bfloat16
    folder = random_folder(m, dtype=build_dtype, seed=cfg.train.seed) if m.init == "random" else pretrained_folder(m)
    kwargs = dict(dtype=compute_dtype, attn_implementation=m.attn_implementation,
                  trust_remote_code=m.trust_remote_code, device_map={"": device}, use_safetensors=True)
    if m.init == "pretrained" and m.revision:
        kwargs["revision"] = m.revision
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantize:
        disable_bnb_cpu_repack(model)
    apply_load_time_levers(model, cfg, device)
    return model


def build_model(cfg: RunConfig, device: torch.device, compute_dtype: torch.dtype):
    """Load (or randomly build) the base model, quantize it to 4-bit if asked, and wrap it in LoRA."""
    from peft import get_peft_model

    model = load_base_model(cfg, device, compute_dtype)
    model.config.use_cache = False
    if cfg.quant.dequantize_for_training:  # config validation refuses it without quant.enabled
        model = dequantize_4bit(model, compute_dtype)
    # Not peft's prepare_model_for_kbit_training: it upcasts every frozen non-4-bit weight (embeddings,
    # LM head, norms) to fp32 (+0.49 GiB on Phi-2 and an fp32 LM-head matmul), and frozen weights need
    # no fp32 master copy.
    model.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.model.gradient_checkpointing and cfg.model.checkpointed_layers is not None:
        limit_checkpointing(model, cfg.model.checkpointed_layers)
    # peft keeps adapter weights in fp32 on a half-precision base (autocast_adapter_dtype), which
    # fp16 loss scaling on a T4 needs: its unscale step refuses fp16 gradients.
    # Seeded here so adapter init does not depend on what ran before (e.g. whether cached weights existed).
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, peft_lora_config(cfg, model.config.model_type))
    if cfg.model.compile_layers:
        compile_decoder_layers(model, for_cuda_graphs=cfg.train.cuda_graphs)
    trainable, total = count_parameters(model)
    log.info("parameters: %s total, %s trainable (%.3f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)
    return model


def require_adapter(adapter_dir, hint: str = "train first") -> None:
    """Fail unless `adapter_dir` holds a trained adapter. `hint` says what to do instead; it comes
    from the caller because only the caller knows which command (and options) the user ran."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no trained adapter ({hint})")
    # Checked whole before a model loads: peft reads a missing weights file as a hub repo id and fails
    # with an unrelated error after the base model has loaded.
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FileNotFoundError(f"{folder / 'adapter_config.json'}: not valid JSON ({e}); the adapter folder "
                                f"is damaged, use a checkpoint's adapter or retrain") from None
    if not isinstance(adapter_config, dict) or "peft_type" not in adapter_config:
        raise FileNotFoundError(f"{folder / 'adapter_config.json'}: not a PEFT adapter config (no peft_type)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; the adapter folder holds no weights (copy them back, "
                                f"use a checkpoint's adapter, or retrain)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise FileNotFoundError(f"{weights}: not a readable safetensors file ({e})") from None


def load_for_inference(cfg: RunConfig, device: torch.device, compute_dtype: torch.dtype, adapter_dir=None,
                       quantize: bool | None = None, *, merge: bool = False, missing_hint: str = "train first"):
    """Base model plus, unless `adapter_dir` is None (zero-shot), a trained adapter; in eval mode.

    `merge` folds the adapter into the weights of this copy when the base is not 4-bit, or is
    dequantized first (eval.dequantize_for_generation); the saved adapter is untouched.
    `missing_hint` ends the error for a missing adapter.
    """
    if adapter_dir is not None:
        require_adapter(adapter_dir, missing_hint)
    quantize = cfg.quant.enabled if quantize is None else quantize
    model = load_base_model(cfg, device, compute_dtype, quantize)
    if quantize and cfg.eval.dequantize_for_generation:
        model, quantize = dequantize_4bit(model, compute_dtype), False
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge and not quantize:
            model = model.merge_and_unload()
    model.eval()
    return model


def dequantize_4bit(model, dtype: torch.dtype):
    """Every 4-bit linear of `model` replaced by a plain linear holding its dequantized weights: the
    values the 4-bit kernels compute with, so outputs stay those of the quantized model while
    matmuls run on standard (and CUDA-graph friendly) kernels. In place; returns the model."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device="meta")
            plain.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                plain.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
            model.set_submodule(name, plain)
    # What peft and transformers read to decide a model is 4-bit.
    for attr in ("is_loaded_in_4bit", "is_quantized", "hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    model.config.__dict__.pop("quantization_config", None)
    return model


def disable_bnb_cpu_repack(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first no-grad forward into
    a layout with no backward; training after an evaluation then gets wrong LoRA gradients or
    crashes. Switching the repack off keeps train -> eval -> train exact
    (tests/test_train.py::test_train_eval_train_gradients_stay_exact_in_4bit guards it)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit parameters are counted by their real element count."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_on_meta(cfg: RunConfig):
    """The configured architecture on the meta device: its modules without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = pretrained_folder(cfg.model) if cfg.model.gguf_file else resolve_folder(cfg.model.name_or_path)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in cfg.model.config_overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_on_meta(cfg: RunConfig):
    """The configured architecture + LoRA on the meta device: parameter counts without weights."""
    from peft import get_peft_model

    model = base_on_meta(cfg)
    return get_peft_model(model, peft_lora_config(cfg, model.config.model_type))


# Architectures whose modules Liger-Kernel patches as model.liger_kernel uses it (RoPE, SwiGLU, RMSNorm).
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_model_settings(cfg: RunConfig) -> None:
    """What would otherwise fail (or go wrong silently) only once the weights load, after the run
    folder exists: an attention kernel that is not installed, LoRA target modules the architecture
    does not have (peft trains the ones it finds and drops the rest without a word)."""
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.train.packing:
        # transformers reads packed rows from position ids for eager and sdpa only; flash-attn 2 would
        # let the examples of a packed row attend to each other.
        raise ConfigError("train.packing: packed rows keep attention inside each example with "
                          "model.attn_implementation 'sdpa' or 'eager', not 'flash_attention_2'")
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: 'flash_attention_2' needs the flash-attn package "
                          "(pip install flash-attn); 'sdpa' needs nothing")
    if cfg.model.compile_layers and torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        # inductor writes Triton kernels for a GPU; without it the first forward fails after the load.
        raise ConfigError("model.compile_layers: compiling on a GPU needs the triton package (pip install triton); "
                          "or set it to false")
    model = base_on_meta(cfg)
    if cfg.model.liger_kernel:
        if model.config.model_type not in LIGER_MODEL_TYPES:
            raise ConfigError(f"model.liger_kernel: Liger-Kernel has no kernels for {model.config.model_type} "
                              f"models (it patches {', '.join(LIGER_MODEL_TYPES)}); set it to false")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("model.liger_kernel: needs the liger-kernel package (pip install liger-kernel)")
        if not torch.cuda.is_available():
            raise ConfigError("model.liger_kernel: its kernels are Triton kernels and need a CUDA GPU; set it to "
                              "false on a CPU")
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in lora_targets(cfg, model.config.model_type)
               if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} matches no module of this "
                          f"{model.config.model_type} model; its linear layers are {', '.join(linear)}")
