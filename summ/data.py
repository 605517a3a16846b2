"""Rows -> tokenized (prompt, summary) examples -> length-grouped, dynamically padded micro-batches.

The loss is on the summary and EOS only. The label mask is built from token positions, never by
matching token ids: Phi-2's pad token is its EOS, and masking every EOS id would teach the model
never to stop.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from summ.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data row or file is unusable and strict mode (or the file as a whole) makes that fatal."""


# ----------------------------------------------------------------------------- rows


@dataclass
class RowStats:
    read: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def load_rows(cfg: DataConfig, split: str, max_rows: int | None = None) -> tuple[list[dict], RowStats]:
    """Load one split (e.g. `train[:5000]`) from a local folder or the hub, keeping usable rows.

    A row with a missing, empty or non-string article or summary is skipped and counted; with
    `data.strict` it is an error naming the row.
    """
    raw_rows, where = _read_split(cfg, split)
    stats = RowStats()
    rows = []
    for index, row in enumerate(raw_rows):
        stats.read += 1
        row_id = row.get(cfg.id_field) if cfg.id_field and isinstance(row, dict) else None
        row_id = str(row_id) if row_id is not None else str(index)
        problem = _row_problem(row, cfg)
        if problem:
            if cfg.strict:
                raise DataError(f"{where}: row {index} (id {row_id}): {problem} (data.strict is on)")
            stats.skip(problem)
            continue
        rows.append({"id": row_id, "article": row[cfg.article_field].strip(),
                     "summary": row[cfg.summary_field].strip()})
        if max_rows is not None and len(rows) >= max_rows:
            break
    stats.kept = len(rows)
    if stats.skipped:
        log.warning("%s: skipped %d of %d rows: %s", where, sum(stats.skipped.values()), stats.read, stats.skipped)
    if not rows:
        raise DataError(f"{where}: no usable rows (read {stats.read}, skipped {stats.skipped})")
    return rows, stats


def _row_problem(row, cfg: DataConfig) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    for role, key in (("article", cfg.article_field), ("summary", cfg.summary_field)):
        value = row.get(key)
        if value is None:
            return f"missing {role} field '{key}'"
        if not isinstance(value, str):
            return f"{role} field '{key}' is {type(value).__name__}, expected a string"
        if not value.strip():
            return f"empty {role} field '{key}'"
    return None


def _read_split(cfg: DataConfig, split: str) -> tuple[list, str]:
    base = split.split("[", 1)[0]
    folder = Path(cfg.dataset)
    if folder.is_dir():
        files = [folder / f"{base}{ext}" for ext in LOCAL_FORMATS if (folder / f"{base}{ext}").is_file()]
        if not files:
            raise ConfigError(f"data.dataset: no {base}.jsonl/.json/.csv/.parquet in {folder} for split '{split}'")
        path = files[0]
        rows = _read_jsonl(path, cfg.strict) if path.suffix == ".jsonl" else _read_with_datasets(path)
        rows = _slice(rows, split, base, str(path))
        _check_columns(rows, cfg, str(path))
        return rows, str(path)
    if folder.exists() or cfg.dataset.startswith((".", "/")):
        raise ConfigError(f"data.dataset: {cfg.dataset} is not a folder of <split>.jsonl files or a hub id")
    import datasets

    where = f"{cfg.dataset}:{split}"
    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as e:  # offline, unknown id, bad config name, bad split: all end the run here
        raise DataError(f"data.dataset: cannot load hub dataset {where} "
                        f"(config {cfg.dataset_config!r}): {type(e).__name__}: {e}") from e
    rows = list(ds)
    _check_columns(rows, cfg, where)
    return rows, where


def _read_jsonl(path: Path, strict: bool) -> list:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if strict:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e}) (data.strict is on)") from None
                log.warning("%s:%d: not valid JSON, skipped", path, line_no)
                rows.append(None)  # counted as a bad row, keeps row indices equal to line order
    return rows


def _read_with_datasets(path: Path) -> list:
    import datasets

    return list(datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"))


def _slice(rows: list, split: str, base: str, where: str) -> list:
    if "[" not in split:
        return rows
    import datasets

    try:
        (instruction,) = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(rows)})
    except Exception as e:  # the library raises several types for a malformed spec
        raise ConfigError(f"{where}: cannot read split spec '{split}' ({e})") from None
    return rows[instruction.from_:instruction.to]


def _check_columns(rows: list, cfg: DataConfig, where: str) -> None:
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is None:
        return
    for key in ("article_field", "summary_field"):
        column = getattr(cfg, key)
        if column not in first:
            raise ConfigError(f"{where}: data.{key}='{column}' is not a column; columns are {sorted(first)}")


# ----------------------------------------------------------------------------- tokenization


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    article_truncated: bool = False
    summary_truncated: bool = False


@dataclass
class PromptTemplate:
    """`head{article}tail{summary}`; the tail's trailing whitespace belongs to the completion.

    BPE and SentencePiece tokenizers fold the space before a word into the word's token, so the
    prompt ends at "Summary:" and the completion starts with " The...". Generation then sees the
    same prompt tokens as training did.
    """

    head: str
    tail: str

    @classmethod
    def parse(cls, template: str) -> "PromptTemplate":
        head, rest = template.split("{article}", 1)
        return cls(head=head, tail=rest[: -len("{summary}")])

    @property
    def prompt_tail(self) -> str:
        return self.tail.rstrip()

    @property
    def completion_prefix(self) -> str:
        return self.tail[len(self.tail.rstrip()):]


class Encoder:
    """Tokenizes rows into examples that fit `max_length`, cutting the article, not the summary."""

    def __init__(self, tokenizer, cfg: DataConfig):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("model.tokenizer: a fast tokenizer (tokenizer.json) is needed for offset-based masking")
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: the tokenizer has no EOS token; summaries could not learn to stop")
        self.tokenizer = tokenizer
        self.template = PromptTemplate.parse(cfg.template)
        self.max_length = cfg.max_length
        self.min_article_tokens = cfg.min_article_tokens
        self.eos_id = tokenizer.eos_token_id
        pre, _, post, _ = self._split("x", "x")
        fixed = len(pre) + len(post)
        # One article token, one summary token and EOS must fit besides the template itself.
        if fixed + 3 > cfg.max_length:
            raise ConfigError(
                f"data.max_length={cfg.max_length} is too small for data.template: the template alone takes "
                f"{fixed} tokens, and one article token, one summary token and EOS must fit too")
        self.fixed_tokens = fixed

    def _split(self, article: str, summary: str | None):
        """Token ids of (template before the article, article, template after it, completion)."""
        t = self.template
        prompt_text = t.head + article + t.prompt_tail
        text = prompt_text if summary is None else prompt_text + t.completion_prefix + summary
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        a0, a1, p_end = len(t.head), len(t.head) + len(article), len(prompt_text)
        pre, art, post, completion = [], [], [], []
        for tid, (start, end) in zip(ids, offsets):
            if start == end:  # a special token: BOS goes with the prompt, an appended EOS is ours to add
                if not (art or post or completion):
                    pre.append(tid)
            elif summary is not None and start >= p_end:
                completion.append(tid)
            elif end <= a0:
                pre.append(tid)
            elif start >= a1:
                post.append(tid)
            else:
                art.append(tid)
        return pre, art, post, completion

    def encode(self, article: str, summary: str) -> Example:
        pre, art, post, summ = self._split(article, summary)
        fixed = len(pre) + len(post)
        summary_budget = self.max_length - fixed - 1 - min(self.min_article_tokens, len(art))
        summary_truncated = len(summ) > summary_budget
        summ = summ[:summary_budget]
        article_budget = self.max_length - fixed - len(summ) - 1
        article_truncated = len(art) > article_budget
        prompt = pre + art[:article_budget] + post
        completion = summ + [self.eos_id]
        return Example(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion,
                       article_truncated=article_truncated, summary_truncated=summary_truncated)

    def encode_prompt(self, article: str, max_new_tokens: int) -> list[int]:
        """Prompt ids for generation: the article cut so the prompt plus `max_new_tokens` fit."""
        pre, art, post, _ = self._split(article, None)
        budget = max(self.max_length - len(pre) - len(post) - max_new_tokens, 1)
        return pre + art[:budget] + post


def encode_rows(encoder: Encoder, rows: list[dict], where: str) -> list[Example]:
    examples = [encoder.encode(r["article"], r["summary"]) for r in rows]
    cut_articles = sum(e.article_truncated for e in examples)
    cut_summaries = sum(e.summary_truncated for e in examples)
    log.info("%s: %d examples, %d articles truncated to fit max_length %d", where, len(examples), cut_articles,
             encoder.max_length)
    if cut_summaries:
        log.warning("%s: %d summaries were longer than the token budget and were cut", where, cut_summaries)
    return examples


# ----------------------------------------------------------------------------- batching


def plan_batches(lengths: list[int], *, micro_batch_size: int, micro_batch_tokens: int | None, seed: int,
                 epoch: int, length_grouping: bool = True, shuffle: bool = True) -> list[list[int]]:
    """The micro-batches of one epoch, as row indices; a pure function of its arguments, so a
    resumed run rebuilds exactly the plan it was following.

    Rows are shuffled, then sorted by length inside windows of ~64 micro-batches so a batch pads
    little, then the batches are shuffled. With `micro_batch_tokens` a batch takes rows while
    rows x longest row stays within the budget. The longest batch goes first so an
    out-of-memory shows at step one, not hours in.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if length_grouping:
        window = 64 * (micro_batch_size if micro_batch_tokens is None
                       else max(1, micro_batch_tokens // max(1, sorted(lengths)[len(lengths) // 2])))
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches: list[list[int]] = []
    if micro_batch_tokens is None:
        batches = [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    else:
        current: list[int] = []
        for i in order:
            longest = max([lengths[j] for j in current] + [lengths[i]])
            if current and longest * (len(current) + 1) > micro_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    if length_grouping:
        if shuffle:
            rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up for tensor-core friendly shapes)."""
    longest = max(len(e.input_ids) for e in examples)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
