"""Summaries for new articles with a trained adapter, and merging the adapter into a plain model."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from summ.config import RunConfig
from summ.data import DataError, Encoder, read_jsonl
from summ.evaluate import Generation, generate_summaries
from summ.files import atomic_folder, not_utf8
from summ.model import load_for_inference, load_tokenizer
from summ.precision import DTYPES, resolve_compute_dtype
from summ.sources import pretrained_folder


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


def check_merge_target(out_dir: str | Path, run_dir: str | Path, force: bool = False) -> None:
    """Refuse to replace a folder the user may still need: a non-empty one unless `force`, and
    never the run the adapter is read from. Nothing is loaded or written here."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--merge {out}: exists and is not a folder")
    resolved, run = out.resolve(), Path(run_dir).resolve()
    if resolved == run or resolved in run.parents:
        raise FileExistsError(f"--merge {out}: would replace the run folder {run_dir} that holds the adapter")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--merge {out}: folder exists and is not empty; pass --force to replace it")


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
                  force: bool = False) -> tuple[Path, torch.dtype]:
    """Fold the adapter into the base weights and save a plain transformers model (safetensors) for
    serving without peft; returns the folder and the dtype written: `dtype` (a DTYPES name) or the
    base model's own.

    Merging into 4-bit weights would round the update away, so the base is loaded unquantized, on
    the CPU (a merge needs no accelerator and host memory is the larger), and merged in float32."""
    check_merge_target(out_dir, run_dir, force)
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
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir), target


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
