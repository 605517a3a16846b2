"""Summaries for new articles with a trained adapter, merging the adapter into a plain model for
serving, and a copy of the base model the adapter attaches to."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from summ.config import ConfigError, RunConfig
from summ.data import DataError, Encoder, read_jsonl
from summ.summaries import Generation, generate_summaries
from summ.files import atomic_folder, not_utf8, write_json
from summ.model import load_for_inference, load_tokenizer
from summ.model_card import write_model_card
from summ.portable import base_model_record, write_portable_files
from summ.precision import DTYPES, resolve_compute_dtype
from summ.sources import pretrained_folder, random_folder


def read_articles(*, text_file: str | None = None, jsonl: str | None = None, field: str = "article") -> list[dict]:
    """Articles to summarize: a text file (or '-' for stdin) holding one article, or a jsonl file
    with one object per line holding `field` (and optionally `id`). Any bad line is an error that
    names it: a prediction request has no rows to spare."""
    if jsonl is not None:
        path = Path(jsonl)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        articles = []
        for raw in read_jsonl(path):
            if raw.problem:
                raise DataError(f"{raw.where}: {raw.problem}")
            text = raw.value.get(field) if isinstance(raw.value, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{raw.where}: expected an object with a non-empty string '{field}'")
            articles.append({"id": str(raw.value.get("id", raw.number)), "article": text.strip()})
        if not articles:
            raise DataError(f"{path}: no articles")
        return articles
    if text_file in (None, "-"):
        text, where = sys.stdin.read(), "stdin"
    else:
        path = Path(text_file)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            text, where = path.read_text(encoding="utf-8-sig"), str(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: {not_utf8(e)}") from None
    if not text.strip():
        raise DataError(f"{where}: empty article")
    return [{"id": where, "article": text.strip()}]


# What to do when the run has no adapter, in terms of `predict`'s own options.
MISSING_ADAPTER_HINT = "train first, or pass --run a run folder holding a trained adapter/"


def summarize(cfg: RunConfig, run_dir: str | Path | None, articles: list[str]) -> list[Generation]:
    """Summaries with the run's adapter (run_dir None: the base model, zero-shot)."""
    device = _device()
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    adapter = None if run_dir is None else Path(run_dir) / "adapter"
    model = load_for_inference(cfg, device, resolve_compute_dtype(cfg.quant.compute_dtype, device), adapter,
                               merge=cfg.eval.merge_adapter, missing_hint=MISSING_ADAPTER_HINT)
    generations, _ = generate_summaries(model, tokenizer, encoder, articles, cfg.eval, device)
    return generations


def check_merge_target(out_dir: str | Path, run_dir: str | Path, force: bool = False, flag: str = "--merge") -> None:
    """Refuse to replace a folder the user may still need: a non-empty one unless `force`, and
    never the run the adapter is read from. Nothing is loaded or written here. `flag` is the option
    that named the folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{flag} {out}: exists and is not a folder")
    resolved, run = out.resolve(), Path(run_dir).resolve()
    if resolved == run or resolved in run.parents:
        raise FileExistsError(f"{flag} {out}: would replace the run folder {run_dir} that holds the adapter")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{flag} {out}: folder exists and is not empty; pass --force to replace it")


def base_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the base weights are published in (their config's `dtype`, `torch_dtype` in older
    configs); float32 for random weights, which have none of their own, or a config that is silent."""
    if cfg.model.init == "random":
        return torch.float32
    from transformers import AutoConfig

    m = cfg.model
    config = AutoConfig.from_pretrained(pretrained_folder(m), revision=m.revision,
                                        trust_remote_code=m.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def merge_adapter(cfg: RunConfig, run_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                  force: bool = False, flag: str = "--merge") -> tuple[Path, torch.dtype]:
    """Fold the adapter into the base weights and save a plain transformers model (safetensors) for
    serving without peft, with the tokenizer (the trained prompt as its chat template), the run's
    decoding as generation_config.json, prompt.json and a model card; returns the folder and the
    dtype written: `dtype` (a DTYPES name) or the base model's own.

    Merging into 4-bit weights would round the update away, so the base is loaded unquantized, on
    the CPU (a merge needs no accelerator and host memory is the larger), and merged in float32."""
    check_merge_target(out_dir, run_dir, force, flag)
    target = DTYPES[dtype] if dtype is not None else base_dtype(cfg)
    # Plain transformers modules are what a reader of the saved model expects.
    plain = replace(cfg, model=replace(cfg.model, fused_ops=False))
    # Random weights are built in the run's compute dtype (summ.model.load_base_model): load that
    # same build, so the adapter lands on the base it was trained with.
    load_dtype = torch.float32 if cfg.model.init == "pretrained" else \
        resolve_compute_dtype(cfg.quant.compute_dtype, _device())
    model = load_for_inference(plain, torch.device("cpu"), load_dtype, Path(run_dir) / "adapter", quantize=False,
                               missing_hint=MISSING_ADAPTER_HINT)
    model = model.float().merge_and_unload().to(target)
    tokenizer = load_tokenizer(cfg)
    written = str(target).removeprefix("torch.")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_portable_files(tmp, cfg, tokenizer, model.generation_config)
        write_json(tmp / "base_model.json", base_model_record(cfg, _base_folder(cfg)))
        write_model_card(cfg, run_dir, tmp, kind="merged", dtype=written)
    return Path(out_dir), target


def _base_folder(cfg: RunConfig) -> str:
    """The folder the base weights load from here (built by summ for GGUF and random weights)."""
    if cfg.model.init == "random":
        # Built in the run's compute dtype, as summ.model.load_base_model builds it.
        dtype = resolve_compute_dtype(cfg.quant.compute_dtype, _device())
        return random_folder(cfg.model, dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16,
                             seed=cfg.train.seed)
    return pretrained_folder(cfg.model)


def export_base(cfg: RunConfig, run_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """A copy of the base weights the adapter attaches to, with the base's tokenizer: for a machine
    where the adapter's base_model_name_or_path (a GGUF rebuild, random weights, a package's folder)
    does not exist. A hub id or a folder the config names needs no copy and is refused."""
    check_merge_target(out_dir, run_dir, force, "--out")
    record = base_model_record(cfg, "")
    if not record["local_folder_only"]:
        raise ConfigError(f"--base-only: the base is {cfg.model.name_or_path}, which transformers loads as it "
                              f"is; no copy is needed")
    source = Path(_base_folder(cfg))
    with atomic_folder(out_dir) as tmp:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if not (tmp / "tokenizer_config.json").is_file():
            load_tokenizer(cfg).save_pretrained(tmp)
    return Path(out_dir)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
