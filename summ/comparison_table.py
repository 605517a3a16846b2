"""The comparison's rows as a table: the markdown table of report.md and the rows of results.csv.

Both show the same columns: the config keys that differ between the runs, then METRIC_COLUMNS.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from summ.comparison_rows import Entry, config_cell
from summ.rouge import ROUGE_KEYS, ROUGE_NAMES, rouge_cell

# (column, report.md header, kinds of row it applies to)
METRIC_COLUMNS = (
    ("train_loss", "train loss (last log window)", ("run",)),
    ("val_loss", "val loss", ("run", "zero-shot")),
    ("perplexity", "perplexity", ("run", "zero-shot")),
    ("loss_rows", "val loss rows", ("run", "zero-shot")),
    *((key, ROUGE_NAMES[key], ("run", "zero-shot", "lead")) for key in ROUGE_KEYS),
    ("eval_rows", "eval rows", ("run", "zero-shot", "lead")),
    ("stopped_by_itself_share", "stopped by itself", ("run", "zero-shot")),
    ("repeats_trigram_share", "repeats a trigram", ("run", "zero-shot")),
    ("train_seconds", "train time", ("run",)),
    ("tokens_per_s", "tokens/s", ("run",)),
    ("peak_gib", "peak GPU GiB", ("run",)),
)
_FORMATS = {"train_loss": "{:.4f}", "val_loss": "{:.4f}", "perplexity": "{:.2f}", "loss_rows": "{}", "eval_rows": "{}",
            "stopped_by_itself_share": "{:.1%}", "repeats_trigram_share": "{:.1%}", "tokens_per_s": "{:,.0f}",
            "peak_gib": "{:.2f}"}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _md_cell(column: str, kinds: tuple, entry: Entry) -> str:
    if entry.kind not in kinds:
        return "–"
    value = entry.values.get(column)
    if value is None:
        return "n/a"
    if column in ROUGE_KEYS:
        return rouge_cell(value)
    if column == "train_seconds":
        return _duration(value)
    return _FORMATS[column].format(value)


def escape(text: str) -> str:
    """Text as one markdown table cell: pipes escaped, on one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _readable(value: str) -> str:
    """A sampled float (a search's lr 0.0016500839023012) to 4 significant digits; results.csv keeps
    every digit."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{number:.4g}"


def markdown_table(entries: list[Entry], hyperparameters: list[str]) -> list[str]:
    headers = ["run", "role", *hyperparameters, *(header for _, header, _ in METRIC_COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for e in entries:
        cells = [e.name, e.role]
        cells += ["–" if (v := config_cell(e, k)) is None else _readable(v) for k in hyperparameters]
        cells += [_md_cell(column, kinds, e) for column, _, kinds in METRIC_COLUMNS]
        lines.append("| " + " | ".join(escape(c) for c in cells) + " |")
    return lines


def relative_to(path: str | Path, folder: str | Path) -> str:
    """`path` as the report's files write it: relative to the report folder, so a report moved together
    with the runs it compares (a search folder holding its report/) still points at them."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def csv_columns(hyperparameters: list[str]) -> list[str]:
    columns = ["name", "role", "kind", "folder", *hyperparameters]
    for column, _, _ in METRIC_COLUMNS:
        columns += [column, f"{column}_low", f"{column}_high"] if column in ROUGE_KEYS else [column]
        if column == "train_loss":
            columns.append("train_loss_steps")
    return columns


def csv_rows(entries: list[Entry], hyperparameters: list[str], out_dir: str | Path) -> list[dict]:
    rows = []
    for e in entries:
        row = {"name": e.name, "role": e.role, "kind": e.kind,
               "folder": relative_to(e.run.path if e.kind == "run" else e.eval_dir, out_dir)}
        for key in hyperparameters:
            value = config_cell(e, key)
            row[key] = "" if value in (None, "n/a") else value
        for column, _, kinds in METRIC_COLUMNS:
            value = e.values.get(column) if e.kind in kinds else None
            if column in ROUGE_KEYS:
                for part, suffix in (("mean", ""), ("low", "_low"), ("high", "_high")):
                    row[column + suffix] = "" if value is None else value[part]
            else:
                row[column] = "" if value is None else value
        steps = e.values.get("train_loss_steps") if e.kind == "run" else None
        row["train_loss_steps"] = "" if steps is None else steps
        rows.append(row)
    return rows


def csv_text(rows: list[dict], hyperparameters: list[str]) -> str:
    """results.csv: a header and one line per row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(hyperparameters), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
