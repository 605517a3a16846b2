"""Rows -> tokenized (prompt, summary) examples -> length-grouped, dynamically padded micro-batches.

The loss is on the summary and EOS only. The label mask is built from token positions, never by
matching token ids: Phi-2's pad token is its EOS, and masking every EOS id would teach the model
never to stop.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from summ.config import ConfigError, DataConfig, looks_like_local_path
from summ.files import looks_binary, text_lines

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Rows are padded to a multiple of this many tokens (tensor-core friendly shapes).
PAD_TO_MULTIPLE_OF = 8
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data row or file is unusable and strict mode (or the file as a whole) makes that fatal."""


# ----------------------------------------------------------------------------- rows


@dataclass
class RowStats:
    read: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    # Where the first skipped rows are (file:line), so a user can open them.
    examples: list = field(default_factory=list)
    # Rows repeating an id already read, and where the first few are.
    duplicate_ids: int = 0
    first_duplicates: list = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> dict:
        return {"read": self.read, "used": self.kept, "skipped": self.n_skipped, "skipped_by_reason": self.skipped,
                "first_skipped": self.examples, "duplicate_ids": self.duplicate_ids}


@dataclass
class RawRow:
    where: str  # file:line (1-based) for local files, dataset:split row N (1-based) for the hub
    number: int  # that line or row number; the row's id when it has none
    value: object  # the parsed row, or None when the line could not be read
    problem: str | None = None  # why the line could not be read


def load_rows(cfg: DataConfig, split: str, max_rows: int | None = None) -> tuple[list[dict], RowStats]:
    """Load one split (e.g. `train[:5000]`) from a local folder or the hub, keeping usable rows.

    A row that cannot be decoded or parsed, or has a missing, empty or non-string article or
    summary, is skipped and counted with its file:line; with `data.strict` it is an error. More
    skipped rows than `data.max_bad_row_share` of those read is an error too: that is a wrong
    file or field, not a few bad rows.
    """
    raw_rows, source = _read_split(cfg, split)
    stats = RowStats()
    rows = []
    seen_ids: set[str] = set()
    for raw in raw_rows:
        stats.read += 1
        problem = raw.problem or _row_problem(raw.value, cfg)
        row_id = raw.value.get(cfg.id_field) if cfg.id_field and isinstance(raw.value, dict) else None
        if problem:
            label = raw.where if row_id is None else f"{raw.where} (id {row_id})"
            if cfg.strict:
                raise DataError(f"{label}: {problem} (data.strict is on)")
            log.warning("%s: %s; row skipped", label, problem)
            stats.skip(problem, raw.where)
            continue
        row_id = str(row_id) if row_id is not None else str(raw.number)
        if row_id in seen_ids:
            stats.duplicate_ids += 1
            if len(stats.first_duplicates) < 3:
                stats.first_duplicates.append(f"id {row_id} at {raw.where}")
            if cfg.drop_duplicate_ids:
                continue
        seen_ids.add(row_id)
        rows.append({"id": row_id, "article": raw.value[cfg.article_field].strip(),
                     "summary": raw.value[cfg.summary_field].strip()})
        if max_rows is not None and len(rows) >= max_rows:
            break
    stats.kept = len(rows)
    if stats.skipped:
        log.warning("%s: skipped %d of %d rows: %s", source, stats.n_skipped, stats.read, stats.skipped)
    if stats.duplicate_ids:
        log.warning("%s: %d rows repeat an id read before (first: %s); %s", source, stats.duplicate_ids,
                    ", ".join(stats.first_duplicates),
                    "dropped (data.drop_duplicate_ids)" if cfg.drop_duplicate_ids
                    else "each copy is used as a row of its own; data.drop_duplicate_ids=true keeps the first only")
    if not rows:
        raise DataError(f"{source}: no usable rows (read {stats.read}, skipped {stats.skipped})")
    if stats.n_skipped > cfg.max_bad_row_share * stats.read:
        raise DataError(f"{source}: {stats.n_skipped} of {stats.read} rows are unusable ({stats.skipped}; first: "
                        f"{stats.examples[0]}), more than data.max_bad_row_share={cfg.max_bad_row_share}; "
                        f"check data.article_field / data.summary_field and the file")
    return rows, stats


def warn_shared_ids(train_rows: list[dict], eval_rows: list[dict], cfg: DataConfig) -> int:
    """Warn, loudly, when validation rows share ids with training rows: the validation figures would
    score articles the model trained on. Returns how many validation rows do."""
    train_ids = {r["id"] for r in train_rows}
    shared = [r["id"] for r in eval_rows if r["id"] in train_ids]
    if shared:
        log.warning("LEAKAGE: %d of %d %s rows have an id that %s also holds (first: %s); validation loss and "
                    "ROUGE score articles the model trained on", len(shared), len(eval_rows), cfg.eval_split,
                    cfg.train_split, ", ".join(shared[:3]))
    return len(shared)


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


def _read_split(cfg: DataConfig, split: str) -> tuple[list[RawRow], str]:
    base = split.split("[", 1)[0]
    folder = Path(cfg.dataset)
    if folder.is_dir():
        files = [folder / f"{base}{ext}" for ext in LOCAL_FORMATS if (folder / f"{base}{ext}").is_file()]
        if not files:
            raise ConfigError(f"data.dataset: no {base}.jsonl/.json/.csv/.parquet in {folder.resolve()} "
                              f"for split '{split}'")
        path = files[0]
        rows = _read_local(path)
        rows = _slice(rows, split, base, str(path))
        _check_columns([r.value for r in rows], cfg, str(path))
        return rows, str(path)
    if folder.exists() or looks_like_local_path(cfg.dataset):
        raise ConfigError(f"data.dataset: {folder.resolve()} is not a folder (expected a folder of <split>.jsonl "
                          f"files, or a hub dataset id)")
    import datasets

    where = f"{cfg.dataset}:{split}"
    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as e:  # offline, unknown id, bad config name, bad split: all end the run here
        raise DataError(f"data.dataset: cannot load hub dataset {where} "
                        f"(config {cfg.dataset_config!r}): {type(e).__name__}: {e}") from e
    rows = [RawRow(f"{where} row {i}", i, row) for i, row in enumerate(ds, 1)]
    _check_columns([r.value for r in rows], cfg, where)
    return rows, where


def _read_local(path: Path) -> list[RawRow]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if path.suffix in (".jsonl", ".json", ".csv") and looks_binary(path):
        raise DataError(f"{path}: binary file; expected UTF-8 text ({path.suffix[1:]})")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    else:
        rows = _read_with_datasets(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_jsonl(path: Path) -> list[RawRow]:
    """Every non-blank line of a JSON Lines file, parsed, or with the reason it could not be."""
    rows = []
    for line_no, text in text_lines(path):
        where = f"{path}:{line_no}"
        if text is None:
            rows.append(RawRow(where, line_no, None, "not UTF-8 text"))
        elif text.strip():
            try:
                rows.append(RawRow(where, line_no, json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append(RawRow(where, line_no, None, f"not valid JSON ({e.msg})"))
    return rows


def _read_csv(path: Path) -> list[RawRow]:
    # Quoted fields may span lines, so the file is decoded as a whole; undecodable bytes become
    # lone surrogates that mark their row as bad instead of failing the file.
    rows = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file")
            while True:
                number = reader.line_num + 1  # the line the next record starts on
                values = next(reader, None)
                if values is None:
                    break
                if not values:  # a blank line
                    continue
                where = f"{path}:{number}"
                if any(_has_surrogates(v) for v in values):
                    rows.append(RawRow(where, number, None, "not UTF-8 text"))
                elif len(values) != len(header):
                    rows.append(RawRow(where, number, None, f"{len(values)} columns, {len(header)} expected"))
                else:
                    rows.append(RawRow(where, number, dict(zip(header, values))))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_with_datasets(path: Path) -> list[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # the library raises many types for one unreadable file
        raise DataError(f"{path}: cannot read as {LOCAL_FORMATS[path.suffix]} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return [RawRow(f"{path} row {i}", i, row) for i, row in enumerate(ds, 1)]


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
    """A field no row has is a wrong name (an error); one that some rows lack is bad rows (skipped)."""
    objects = [r for r in rows if isinstance(r, dict)]
    if not objects:
        return
    for key in ("article_field", "summary_field"):
        column = getattr(cfg, key)
        if not any(column in r for r in objects):
            raise ConfigError(f"{where}: data.{key}='{column}' is not a column; columns are {sorted(objects[0])}")


# ----------------------------------------------------------------------------- tokenization


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    article_truncated: bool = False
    summary_truncated: bool = False


@dataclass
class PromptTemplate:
    """`head{article}tail{summary}`; with `completion_takes_space` the tail's trailing whitespace
    belongs to the completion.

    BPE and SentencePiece tokenizers fold the space before a word into the word's token, so a raw
    prompt ends at "Summary:" and the completion starts with " The...". Generation then sees the
    same prompt tokens as training did. A chat template's assistant turn starts after a newline of
    its own, which stays in the prompt, as the chat template's generation prompt has it.
    """

    head: str
    tail: str
    completion_takes_space: bool = True

    @classmethod
    def parse(cls, template: str, completion_takes_space: bool = True) -> "PromptTemplate":
        head, rest = template.split("{article}", 1)
        return cls(head=head, tail=rest[: -len("{summary}")], completion_takes_space=completion_takes_space)

    @property
    def prompt_tail(self) -> str:
        return self.tail.rstrip() if self.completion_takes_space else self.tail

    @property
    def completion_prefix(self) -> str:
        return self.tail[len(self.prompt_tail):]

    @property
    def text(self) -> str:
        return self.head + "{article}" + self.tail + "{summary}"


def prompt_template(cfg: DataConfig, tokenizer) -> PromptTemplate:
    """data.template as written ("raw"), or ("chat") data.chat_instruction as the user turn and the
    summary as the assistant turn, through the tokenizer's own chat template."""
    if cfg.prompt_format == "raw":
        return PromptTemplate.parse(cfg.template)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.prompt_format: 'chat' needs a tokenizer with a chat template; "
                          f"{tokenizer.name_or_path} has none (use 'raw' and data.template)")
    # Placeholders travel through the template's Jinja as plain text and are found again after it.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": cfg.chat_instruction}, {"role": "assistant", "content": "{summary}"}],
        tokenize=False)
    if rendered.count("{article}") != 1 or rendered.count("{summary}") != 1:
        raise ConfigError(f"data.prompt_format: the chat template of {tokenizer.name_or_path} does not keep the "
                          f"message text as written")
    template, after = rendered.split("{summary}")
    if not after.startswith(tokenizer.eos_token):
        raise ConfigError(f"data.prompt_format: the chat template of {tokenizer.name_or_path} ends the assistant "
                          f"turn with {after[:20]!r}, not with the EOS token {tokenizer.eos_token!r} that "
                          f"training teaches and generation stops at; use 'raw'")
    return PromptTemplate.parse(template + "{summary}", completion_takes_space=False)


class Encoder:
    """Tokenizes rows into examples that fit `max_length`, cutting the article, not the summary."""

    def __init__(self, tokenizer, cfg: DataConfig):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("model.tokenizer: a fast tokenizer (tokenizer.json) is needed for offset-based masking")
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: the tokenizer has no EOS token; summaries could not learn to stop")
        self.tokenizer = tokenizer
        self.template = prompt_template(cfg, tokenizer)
        # A rendered chat template holds its own special tokens (BOS where the model wants one).
        self.add_special_tokens = cfg.prompt_format == "raw"
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
        if fixed + cfg.min_article_tokens + 2 > cfg.max_length:
            raise ConfigError(
                f"data.min_article_tokens={cfg.min_article_tokens} does not fit data.max_length={cfg.max_length}: "
                f"the template takes {fixed} tokens, and a summary token and EOS must fit too; lower "
                f"data.min_article_tokens to at most {cfg.max_length - fixed - 2} or raise data.max_length")
        self.fixed_tokens = fixed

    def _split(self, article: str, summary: str | None):
        """Token ids of (template before the article, article, template after it, completion)."""
        t = self.template
        prompt_text = t.head + article + t.prompt_tail
        text = prompt_text if summary is None else prompt_text + t.completion_prefix + summary
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=self.add_special_tokens)
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
        # __init__ checked that the template, min_article_tokens, one summary token and EOS fit; the
        # clamps guard a template that tokenizes a token longer next to some article (a slice with a
        # negative bound would cut from the wrong end).
        summary_budget = max(self.max_length - fixed - 1 - min(self.min_article_tokens, len(art)), 1)
        summary_truncated = len(summ) > summary_budget
        summ = summ[:summary_budget]
        article_budget = max(self.max_length - fixed - len(summ) - 1, 0)
        article_truncated = len(art) > article_budget
        prompt = pre + art[:article_budget] + post
        completion = summ + [self.eos_id]
        return Example(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion,
                       article_truncated=article_truncated, summary_truncated=summary_truncated)

    def encode_prompt(self, article: str) -> list[int]:
        """Prompt ids for generation, with as much article as a training prompt of the shortest
        summary carried: generation runs past max_length by its new tokens instead of cutting the
        article to make room for them (the model would otherwise summarize less than it learned on)."""
        pre, art, post, _ = self._split(article, None)
        # Clamped like encode's budgets: a negative bound would keep the article's end instead.
        return pre + art[:max(self.max_length - len(pre) - len(post) - 1, 0)] + post


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


def plan_batches(lengths: list[int], *, micro_batch_size: int, seed: int, epoch: int,
                 length_grouping: bool = True) -> list[list[int]]:
    """The planned micro-batches of one epoch, as row indices; `grad_accum_steps` of them in a row
    make an optimizer step. A pure function of its arguments, so a resumed run rebuilds exactly the
    plan it was following.

    Rows are shuffled, then sorted by length inside windows of 64 micro-batches so a batch of several
    rows pads little, then the batches are shuffled, the longest first. (The loop may then regroup a
    step's rows by a token budget: `split_by_tokens`.)
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if length_grouping:
        window = 64 * micro_batch_size
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    if length_grouping:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def padded_length(length: int, multiple: int = PAD_TO_MULTIPLE_OF) -> int:
    return -(-length // multiple) * multiple


def split_by_tokens(rows: list[int], lengths: list[int], budget: int, pack_into: int | None = None) -> list[list[int]]:
    """Rows (one optimizer step's) as micro-batches of at most `budget` tokens, counted as the tensor
    `collate` builds (rows x the longest row, padded), or with `pack_into` as the one
    `collate_packed` builds (packed rows of up to `pack_into` tokens x the longest, padded). Greedy,
    longest rows first, so each micro-batch holds rows of similar length; a row longer than the
    budget goes alone. Which micro-batch a row lands in does not change the step's gradient (the
    loss is normalised over the whole step)."""
    def tokens(batch: list[int]) -> int:
        if pack_into is None:
            return padded_length(max(lengths[j] for j in batch)) * len(batch)
        packed = pack_rows([lengths[j] for j in batch], pack_into)
        return padded_length(max(sum(lengths[batch[k]] for k in row) for row in packed)) * len(packed)

    batches: list[list[int]] = []
    for i in sorted(rows, key=lambda i: -lengths[i]):
        if batches and tokens(batches[-1] + [i]) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of `lengths` packed into rows of at most `row_tokens` tokens: first fit, longest first
    (an item longer than a row gets one of its own)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, u in enumerate(used) if u + lengths[i] <= row_tokens), None)
        if fit is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[fit].append(i)
            used[fit] += lengths[i]
    return rows


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up for tensor-core friendly shapes)."""
    longest = padded_length(max(len(e.input_ids) for e in examples), pad_to_multiple_of)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: list[Example], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Examples packed back to back into rows of at most `row_tokens` tokens (first fit, longest
    first), position ids restarting at each example: almost no padding, and attention costs no more
    than in a padded batch of rows that long.

    transformers reads the restarting position ids (with no attention mask) as packed sequences and
    keeps attention inside each example, so loss and gradients equal those of `collate`'s padded
    batch. The shifted next-token targets never cross from one example into the next: each
    example starts with prompt tokens, which carry no label. A row's tail padding is a sequence of
    its own, without labels.
    """
    rows = [[examples[i] for i in row] for row in pack_rows([len(e.input_ids) for e in examples], row_tokens)]
    width = padded_length(max(sum(len(x.input_ids) for x in r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # Real tokens. Right-padded, so the loss passes no mask to the model (which then reads the
    # packing from the position ids); it counts tokens.
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = [t for e in row for t in e.input_ids]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.tensor([t for e in row for t in e.labels])
        positions = [p for e in row for p in range(len(e.input_ids))]
        positions += range(width - len(ids))
        position_ids[i] = torch.tensor(positions)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
