"""Summaries for new articles with a trained adapter, and merging the adapter into a plain model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from summ.config import RunConfig
from summ.data import DataError, Encoder
from summ.evaluate import Generation, generate_summaries
from summ.model import load_for_inference, load_tokenizer, resolve_compute_dtype


def read_articles(*, text_file: str | None = None, jsonl: str | None = None, field: str = "article") -> list[dict]:
    """Articles to summarize: a text file (or '-' for stdin) holding one article, or a jsonl file
    with one object per line holding `field` (and optionally `id`). Any bad line is an error that
    names it: a prediction request has no rows to spare."""
    if jsonl is not None:
        path = Path(jsonl)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        articles = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{line_no}: expected an object with a non-empty string '{field}'")
            articles.append({"id": str(row.get("id", line_no)), "article": text.strip()})
        if not articles:
            raise DataError(f"{path}: no articles")
        return articles
    if text_file in (None, "-"):
        text, where = sys.stdin.read(), "stdin"
    else:
        path = Path(text_file)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        text, where = path.read_text(encoding="utf-8"), str(path)
    if not text.strip():
        raise DataError(f"{where}: empty article")
    return [{"id": where, "article": text.strip()}]


def summarize(cfg: RunConfig, run_dir: str | Path | None, articles: list[str]) -> list[Generation]:
    """Summaries with the run's adapter (run_dir None: the base model, zero-shot)."""
    device = _device()
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    adapter = None if run_dir is None else Path(run_dir) / "adapter"
    model = load_for_inference(cfg, device, resolve_compute_dtype(cfg.quant.compute_dtype, device), adapter)
    generations, _ = generate_summaries(model, tokenizer, encoder, articles, cfg.eval, device)
    return generations


def merge_adapter(cfg: RunConfig, run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into a full-precision copy of the base weights and save it as safetensors, for
    serving without peft. Merging into 4-bit weights would round the update away, so the base is
    loaded unquantized."""
    device = _device()
    dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)
    model = load_for_inference(cfg, device, dtype, Path(run_dir) / "adapter", quantize=False).merge_and_unload()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
