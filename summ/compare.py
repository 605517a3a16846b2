"""`run.py report`: runs and searches side by side, with their baselines and published results.

Reads run folders (config.json, log.jsonl, metrics.json, eval/, zero_shot/, lead/) and search
folders (trials.csv, search.json, each trial's own run folder) and writes report.md, results.csv and
PNG plots into one output folder. The inputs are only read; every input is checked before anything
is written, so a wrong path costs nothing.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from summ.errors import excerpt
from summ.files import json_records, write_atomic
from summ.published import DATASET_TITLES, PUBLISHED, TEST_ROWS, TRAIN_ROWS, dataset_family
from summ.report import error_summary_lines, rouge_cell
from summ.rouge import ROUGE_KEYS


class ReportError(ValueError):
    """An input folder is not a run or search folder, or a file in it cannot be read."""


EVAL_SUBDIRS = {"run": "eval", "zero-shot": "zero_shot", "lead": "lead"}
_EXPECTED = ("a run folder (config.json and metrics.json, log.jsonl or an eval/, zero_shot/ or lead/ "
             "eval_metrics.json) or a search folder (trials.csv and search.json)")
# A search's objective names a metric; trials.csv keeps it under this column (`run.py tune` ranks
# trials by their last validation loss, the model it would keep).
OBJECTIVE_COLUMNS = {"val_loss": "last_val_loss"}
# Which sections of a run's config describe a row of each kind: a zero-shot row had no training, and
# LEAD depends on the data alone.
_CONFIG_SECTIONS = {"run": None, "zero-shot": ("model", "quant", "data", "eval"), "lead": ("data",)}
ROUGE_HEADERS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# (column, report.md header, kinds of row it applies to)
METRIC_COLUMNS = (
    ("train_loss", "train loss", ("run",)),
    ("val_loss", "val loss", ("run", "zero-shot")),
    ("perplexity", "perplexity", ("run", "zero-shot")),
    *((key, ROUGE_HEADERS[key], ("run", "zero-shot", "lead")) for key in ROUGE_KEYS),
    ("eval_rows", "eval rows", ("run", "zero-shot", "lead")),
    ("stopped_by_itself_share", "stopped by itself", ("run", "zero-shot")),
    ("repeats_trigram_share", "repeats a trigram", ("run", "zero-shot")),
    ("train_seconds", "train time", ("run",)),
    ("tokens_per_s", "tokens/s", ("run",)),
    ("peak_gib", "peak GPU GiB", ("run",)),
)
DPI = 100
LOSS_FIGSIZE = (10.0, 5.5)
ROUGE_FIGSIZE = (11.0, 5.5)
OBJECTIVE_PANEL = (4.5, 3.5)


# ----------------------------------------------------------------------------- reading the inputs


@dataclass
class RunFolder:
    path: Path
    name: str
    config: dict
    train: dict | None  # metrics.json
    log: list[dict]  # log.jsonl
    evals: dict[str, dict]  # row kind -> that subfolder's eval_metrics.json


@dataclass
class Entry:
    """One row of the table: a run's fine-tuned evaluation, its zero-shot one, or its LEAD baseline."""
    kind: str  # "run", "zero-shot" or "lead"
    run: RunFolder
    name: str = ""
    role: str = ""  # "baseline", "best" or ""
    values: dict = field(default_factory=dict)
    # Other runs whose lead/ holds the very same figures: the row stands for them too.
    same_lead: list = field(default_factory=list)

    @property
    def eval_dir(self) -> Path:
        return self.run.path / EVAL_SUBDIRS[self.kind]

    @property
    def metrics(self) -> dict | None:
        return self.run.evals.get(self.kind)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role})" if self.role else self.name


@dataclass
class Search:
    path: Path
    metric: str
    mode: str
    column: str  # the trials.csv column holding the objective
    keys: list[str]  # searched config keys
    trials: list[dict]  # trials.csv rows
    runs: dict[str, RunFolder]  # trial_id -> its run folder, where it has one
    best_trial: str | None

    def objective(self, trial: dict) -> float | None:
        return _number(trial.get(self.column))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in json_records(path) if isinstance(r.get("step"), int)]


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _has_results(path: Path) -> bool:
    return ((path / "metrics.json").is_file() or (path / "log.jsonl").is_file()
            or any((path / sub / "eval_metrics.json").is_file() for sub in EVAL_SUBDIRS.values()))


def _read_run(path: Path, name: str) -> RunFolder:
    if not _has_results(path):
        raise ReportError(f"{path}: has config.json but no results; a run folder needs metrics.json, log.jsonl "
                          f"or an eval/, zero_shot/ or lead/ eval_metrics.json")
    evals = {kind: _read_json(path / sub / "eval_metrics.json") for kind, sub in EVAL_SUBDIRS.items()
             if (path / sub / "eval_metrics.json").is_file()}
    return RunFolder(path=path, name=name, config=_read_json(path / "config.json"),
                     train=_read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None,
                     log=_read_log(path / "log.jsonl"), evals=evals)


def _read_search(path: Path) -> Search:
    if not (path / "search.json").is_file():
        raise ReportError(f"{path}: has trials.csv but no search.json; a search folder needs both")
    spec = _read_json(path / "search.json")
    metric, mode = spec.get("metric"), spec.get("mode")
    if not isinstance(metric, str) or mode not in ("min", "max"):
        raise ReportError(f"{path / 'search.json'}: expected \"metric\" (a trials.csv column) and \"mode\" "
                          f"(\"min\" or \"max\"), got metric={metric!r}, mode={mode!r}")
    try:
        with open(path / "trials.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            trials, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"{path / 'trials.csv'}: cannot read it as CSV ({e})") from None
    column = OBJECTIVE_COLUMNS.get(metric, metric)
    missing = [c for c in ("trial_id", "status", "run_dir", column) if c not in columns]
    if missing:
        raise ReportError(f"{path / 'trials.csv'}: missing column(s) {missing}; has {columns}")
    space = spec.get("space") if isinstance(spec.get("space"), dict) else {}
    keys = [k for k in space if k in columns] or [c for c in columns if "." in c]
    runs, folders = {}, {}
    for trial in trials:
        if not trial["run_dir"]:
            continue
        folder = folders[trial["trial_id"]] = _under(path, trial["run_dir"])
        if (folder / "config.json").is_file() and _has_results(folder):
            runs[trial["trial_id"]] = _read_run(folder, f"{path.name}/{trial['trial_id']}")
    if "best_trial" in spec:  # the search's own choice, by its run folder
        chosen = _under(path, spec["best_trial"]) if spec["best_trial"] else None
        best = next((t for t, folder in folders.items() if folder == chosen), None)
    else:  # as `run.py tune` chooses: the best objective among the trials that ran their whole budget
        done = [t for t in trials if t["status"] == "completed" and _number(t.get(column)) is not None]
        best = (min if mode == "min" else max)(done, key=lambda t: _number(t[column]))["trial_id"] if done else None
    return Search(path=path, metric=metric, mode=mode, column=column, keys=keys, trials=trials, runs=runs,
                  best_trial=best)


def _under(folder: Path, path: str) -> Path:
    """`path` as written in a search's files: absolute, or relative to the search folder."""
    return (folder / path).resolve()


def read_input(path: str | Path) -> RunFolder | Search:
    """A run folder or a search folder, told apart by the files it holds."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: not found; expected {_EXPECTED}")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; expected {_EXPECTED}")
    if (path / "trials.csv").is_file():
        return _read_search(path)
    if (path / "config.json").is_file():
        return _read_run(path, path.resolve().name)
    raise ReportError(f"{path}: neither a run folder nor a search folder; expected {_EXPECTED}")


# ----------------------------------------------------------------------------- rows


def flat_config(config: dict) -> dict[str, str]:
    """`section.key` -> value as text, without `log.*` (where a run writes, not how it ran)."""
    flat = {}
    for section, values in config.items():
        if section == "log" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat


def differing_keys(runs: list[RunFolder]) -> list[str]:
    """Config keys whose value is not the same in every run (a key a run lacks counts as differing)."""
    flats = [flat_config(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({f.get(k) for f in flats}) > 1]


def _log_totals(log: list[dict]) -> tuple[float | None, float | None]:
    """Training seconds (evaluation excluded, as the loop times it) and non-pad tokens per second."""
    timed = [r for r in log if "train/seconds" in r and "train/tokens" in r]
    seconds = sum(r["train/seconds"] for r in timed)
    if not timed or seconds <= 0:
        return None, None
    return seconds, sum(r["train/tokens"] for r in timed) / seconds


def _values(entry: Entry) -> dict:
    """The table's numbers for one row; None where the run did not record them."""
    m, run = entry.metrics or {}, entry.run
    train = run.train or {}
    values = {"eval_rows": m.get("generated_rows"), "stopped_by_itself_share": m.get("stopped_by_itself_share"),
              "repeats_trigram_share": m.get("errors", {}).get("repeats_trigram_share")}
    for key in ROUGE_KEYS:
        values[key] = m["rouge"][key] if "rouge" in m else None
    if entry.kind == "run":
        # The eval pipeline's loss where there is one, so a fine-tuned row and its zero-shot row are
        # measured the same way; otherwise the last validation pass of training.
        values["val_loss"] = m.get("val_loss", train.get("final_val_loss"))
        values["perplexity"] = m.get("val_perplexity", train.get("final_val_perplexity"))
        logged = [r["train/loss"] for r in run.log if _number(r.get("train/loss")) is not None]
        # The last logged value is a mean over log.log_every steps, steadier than the last step alone.
        values["train_loss"] = logged[-1] if logged else train.get("final_train_loss")
        values["train_seconds"], values["tokens_per_s"] = _log_totals(run.log)
        values["peak_gib"] = train.get("memory/peak_allocated_gib")
    elif entry.kind == "zero-shot":
        values["val_loss"], values["perplexity"] = m.get("val_loss"), m.get("val_perplexity")
    return values


def _lead_k(metrics: dict) -> int | str:
    if isinstance(metrics.get("k"), int):
        return metrics["k"]
    return str(metrics.get("baseline", "lead-k")).rsplit("-", 1)[-1]


def _entries(runs: list[RunFolder]) -> list[Entry]:
    """The table's rows in input order: each run, then its zero-shot and LEAD rows. LEAD rows equal in
    every figure (the same data scored twice) are shown once."""
    entries, leads = [], {}
    for run in runs:
        if run.train is not None or run.log or "run" in run.evals:
            entries.append(Entry("run", run))
        if "zero-shot" in run.evals:
            entries.append(Entry("zero-shot", run))
        lead = run.evals.get("lead")
        if lead is not None:
            key = (lead.get("baseline"), lead.get("split"), lead.get("generated_rows"), json.dumps(lead.get("rouge")))
            if key in leads:
                leads[key].same_lead.append(run)
            else:
                leads[key] = Entry("lead", run)
                entries.append(leads[key])
    _name_entries(entries)
    for e in entries:
        e.values = _values(e)
    return entries


def _name_entries(entries: list[Entry]) -> None:
    runs = list({id(e.run): e.run for e in entries}.values())
    counts = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    # Two folders of one name (runs/a/smol, runs/b/smol) are told apart by their parent folder.
    shown = {id(r): f"{r.path.resolve().parent.name}/{r.name}" if counts[r.name] > 1 else r.name for r in runs}
    leads = [e for e in entries if e.kind == "lead"]
    for e in entries:
        run_name = shown[id(e.run)]
        if e.kind == "run":
            e.name = run_name
        elif e.kind == "zero-shot":
            e.name = f"zero-shot {run_name}"
        else:
            k = _lead_k(e.metrics)
            same_k = [x for x in leads if _lead_k(x.metrics) == k]
            e.name = f"LEAD-{k}" if len(same_k) == 1 else f"LEAD-{k} {run_name}"
    taken: dict[str, int] = {}
    for e in entries:
        taken[e.name] = taken.get(e.name, 0) + 1
        if taken[e.name] > 1:
            e.name = f"{e.name} ({taken[e.name]})"


def _pick(entries: list[Entry], spec: str | Path, option: str) -> Entry:
    """The row a --baseline/--best names: a row name, a run folder (its fine-tuned row), or a run's
    zero_shot/ or lead/ folder."""
    for e in entries:
        if e.name == str(spec):
            return e
    target = Path(spec).resolve()
    for e in entries:
        if e.kind == "run":
            paths = [e.run.path]
        else:
            paths = [e.eval_dir] + [run.path / EVAL_SUBDIRS["lead"] for run in e.same_lead]
        if target in [path.resolve() for path in paths]:
            return e
    raise ReportError(f"{option} {spec}: not a row of this report; expected a run folder given to it, its "
                      f"zero_shot/ or lead/ folder, or one of {[e.name for e in entries]}")


def assign_roles(entries: list[Entry], baseline=None, best=None) -> tuple[Entry | None, Entry | None]:
    """The baseline (default: the zero-shot row of the best run, else of the first run, else of any
    run, then the same for LEAD rows) and the best row (default: the fine-tuned row with the lowest
    validation loss)."""
    best_entry = _pick(entries, best, "--best") if best is not None else min(
        (e for e in entries if e.kind == "run" and e.values["val_loss"] is not None),
        key=lambda e: e.values["val_loss"], default=None)
    if baseline is not None:
        base_entry = _pick(entries, baseline, "--baseline")
    else:
        first = next((e.run for e in entries if e.kind == "run"), entries[0].run if entries else None)
        preferred = [best_entry.run if best_entry is not None else None, first, None]
        base_entry = next((e for kind in ("zero-shot", "lead") for run in preferred for e in entries
                           if e.kind == kind and (run is None or e.run is run)), None)
    if base_entry is not None and base_entry is best_entry:
        raise ReportError(f"--baseline and --best both name {base_entry.name}; pick two different rows")
    for e, role in ((base_entry, "baseline"), (best_entry, "best")):
        if e is not None:
            e.role = role
    return base_entry, best_entry


# ----------------------------------------------------------------------------- report.md and results.csv


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


_FORMATS = {"train_loss": "{:.4f}", "val_loss": "{:.4f}", "perplexity": "{:.2f}", "eval_rows": "{}",
            "stopped_by_itself_share": "{:.1%}", "repeats_trigram_share": "{:.1%}", "tokens_per_s": "{:,.0f}", "peak_gib": "{:.2f}"}


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


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _config_cell(entry: Entry, key: str) -> str | None:
    """The row's value of a config key; None where the key does not describe this kind of row."""
    sections = _CONFIG_SECTIONS[entry.kind]
    if sections is not None and key.split(".", 1)[0] not in sections:
        return None
    return flat_config(entry.run.config).get(key, "n/a")


def csv_columns(hyperparameters: list[str]) -> list[str]:
    columns = ["name", "role", "kind", "folder", *hyperparameters]
    for column, _, _ in METRIC_COLUMNS:
        columns += [column, f"{column}_low", f"{column}_high"] if column in ROUGE_KEYS else [column]
    return columns


def csv_rows(entries: list[Entry], hyperparameters: list[str]) -> list[dict]:
    rows = []
    for e in entries:
        row = {"name": e.name, "role": e.role, "kind": e.kind,
               "folder": str(e.run.path if e.kind == "run" else e.eval_dir)}
        for key in hyperparameters:
            value = _config_cell(e, key)
            row[key] = "" if value in (None, "n/a") else value
        for column, _, kinds in METRIC_COLUMNS:
            value = e.values.get(column) if e.kind in kinds else None
            if column in ROUGE_KEYS:
                for part, suffix in (("mean", ""), ("low", "_low"), ("high", "_high")):
                    row[column + suffix] = "" if value is None else value[part]
            else:
                row[column] = "" if value is None else value
        rows.append(row)
    return rows


def _table(entries: list[Entry], hyperparameters: list[str]) -> list[str]:
    headers = ["run", "role", *hyperparameters, *(header for _, header, _ in METRIC_COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for e in entries:
        cells = [e.name, e.role]
        cells += ["–" if (v := _config_cell(e, k)) is None else v for k in hyperparameters]
        cells += [_md_cell(column, kinds, e) for column, _, kinds in METRIC_COLUMNS]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def _families(runs: list[RunFolder]) -> tuple[list[str], list[str]]:
    """The datasets with published figures, and the data.dataset values without any."""
    known, unknown = [], []
    for run in runs:
        data = run.config.get("data", {}) if isinstance(run.config.get("data"), dict) else {}
        dataset = str(data.get("dataset", ""))
        family = dataset_family(dataset, str(data.get("summary_field", "")))
        group = unknown if family is None else known
        if (family or dataset) not in group:
            group.append(family or dataset)
    return known, unknown


def _published_lines(families: list[str], unknown: list[str]) -> list[str]:
    lines = ["## Published results", ""]
    for family in families:
        # CNN/DailyMail papers' "ROUGE-L" is the summary-level LCS, our ROUGE-Lsum.
        rl = "ROUGE-L (= ROUGE-Lsum)" if family == "cnn_dailymail" else "ROUGE-L"
        lines += [
            f"{DATASET_TITLES[family]}: published results on the full test set ({TEST_ROWS[family]:,} articles), "
            f"of pretrained encoder-decoder summarizers fine-tuned on the full training set "
            f"({TRAIN_ROWS[family]:,} articles); LEAD needs no training. For scale: the rows above are scored on "
            f"validation rows, so this is not a like-for-like comparison.",
            "", f"| system | ROUGE-1 | ROUGE-2 | {rl} | source |", "|---|---|---|---|---|",
        ]
        lines += [f"| {p.system} | {p.rouge1:.2f} | {p.rouge2:.2f} | {p.rougeL:.2f} | {p.source} |"
                  for p in PUBLISHED[family]]
        lines.append("")
    if unknown:
        lines += [f"No published figures for data.dataset {', '.join(repr(d) for d in unknown)}: they are listed "
                  f"for XSum and CNN/DailyMail only.", ""]
    return lines


def _predictions(entry: Entry) -> dict[str, dict] | None:
    path = entry.eval_dir / "predictions.jsonl"
    if not path.is_file():
        return None
    return {str(r["id"]): r for r in json_records(path) if "id" in r}


def _article(entry: Entry, row_id: str, record: dict) -> tuple[str | None, str]:
    """The article of `row_id` (None and why not, when it cannot be read): predictions.jsonl does not
    keep articles, so they come from the run's data as its config.json describes it."""
    if isinstance(record.get("article"), str):
        return record["article"], ""
    config = entry.run.path / "config.json"
    try:
        # Imported here: reading data pulls in torch, which the rest of the report does not need.
        from summ.config import load_config
        from summ.data import load_rows

        cfg = load_config(config)
        rows, _ = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    except Exception as e:  # any failure to reach the data costs the excerpt, never the report
        return None, f"cannot read the run's data: {(str(e).splitlines() or [type(e).__name__])[0]}"
    found = next((r["article"] for r in rows if r["id"] == row_id), None)
    if found is None:
        return None, f"id {row_id} is not in {config}'s data.eval_split"
    return found, ""


def _sample_lines(baseline: Entry | None, best: Entry | None) -> list[str]:
    lines = ["## Sample prediction", ""]
    shown = [e for e in (baseline, best) if e is not None]
    if best is None:
        return lines + ["No sample: no best run (no fine-tuned row has a validation loss).", ""]
    predictions = {id(e): _predictions(e) for e in shown}
    lacking = [e.name for e in shown if predictions[id(e)] is None]
    if lacking:
        return lines + [f"No sample: no predictions.jsonl for {', '.join(lacking)}.", ""]
    ids = [i for i in predictions[id(best)] if all(i in predictions[id(e)] for e in shown)]
    if not ids:
        return lines + [f"No sample: {' and '.join(e.name for e in shown)} share no example id.", ""]
    # The example at the best run's median ROUGE-Lsum: typical, not picked to flatter.
    by_score = sorted(ids, key=lambda i: _number(predictions[id(best)][i].get("rougeLsum")) or 0.0)
    row_id = by_score[(len(by_score) - 1) // 2]
    record = predictions[id(best)][row_id]
    article, why_not = _article(best, row_id, record)
    lines += [f"Example `{row_id}`, at {best.name}'s median ROUGE-Lsum.", "",
              f"- **Article:** {_escape(excerpt(article)) if article is not None else '(not shown: ' + why_not + ')'}",
              f"- **Reference:** {_escape(record.get('reference', ''))}"]
    for e in shown:
        p = predictions[id(e)][row_id]
        score = _number(p.get("rougeLsum"))
        lines.append(f"- **{_escape(e.label)}:** {_escape(p.get('prediction', '')) or '(empty)'}"
                     + (f" (ROUGE-Lsum {score:.1f})" if score is not None else ""))
    return lines + [""]


def _errors_lines(best: Entry | None) -> list[str]:
    lines = ["## Error analysis of the best run", ""]
    errors = (best.metrics or {}).get("errors") if best is not None else None
    if not errors or not errors.get("n"):
        return lines + [f"No error analysis: {best.name if best else 'no best run'} has no \"errors\" in its "
                        f"eval_metrics.json.", ""]
    return lines + [f"{best.name}, {errors['n']} examples ({best.eval_dir / 'errors.jsonl'} per example).", "",
                    *error_summary_lines(errors)]


def _search_lines(search: Search) -> list[str]:
    shown = [c for c in ("steps", "best_val_loss", "last_val_loss", "rougeLsum", "wall_s", "peak_gib")
             if c in (search.trials[0] if search.trials else {})]
    headers = ["trial", "status", *search.keys, *shown, "row above", "best"]
    lines = [f"## Search `{search.path.name}`", "",
             f"{len(search.trials)} trials; objective {search.metric} ({search.mode}imize, column "
             f"`{search.column}`); best trial: {search.best_trial if search.best_trial is not None else 'none'}"
             + (f" (its config: {search.path / 'best.json'})" if (search.path / "best.json").is_file() else "")
             + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for t in search.trials:
        cells = [t["trial_id"], t["status"]]
        for column in [*search.keys, *shown]:
            value = _number(t.get(column))
            cells.append(f"{value:.4g}" if value is not None else (t.get(column) or "n/a"))
        run = search.runs.get(t["trial_id"])
        cells += [run.name if run else "none (no run folder)", "yes" if t["trial_id"] == search.best_trial else ""]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines + [""]


def _report_lines(entries, hyperparameters, inputs, searches, runs, baseline, best, figures) -> list[str]:
    lines = ["# Comparison", "", "Inputs: " + ", ".join(f"`{p}`" for p in inputs) + ".", "",
             f"Baseline: {baseline.name if baseline else 'none'}; best: {best.name if best else 'none'}.", ""]
    if hyperparameters:
        lines += ["Config keys shown: those that differ between the runs (`log.*` left out).", ""]
    elif len(runs) > 1:
        lines += ["The runs share one config (`log.*` left out).", ""]
    lines += _table(entries, hyperparameters)
    lines += [
        "",
        "ROUGE F1 mean [95% bootstrap interval] on the eval rows; val loss and perplexity on the summary + EOS "
        "tokens; train loss: the last logged value; train time and tokens/s: the training steps as log.jsonl "
        "timed them (evaluation excluded); peak GPU memory allocated while training. –: does not apply to the "
        "row; n/a: not recorded.",
        "",
    ]
    rows_used = {(e.values["eval_rows"], (e.metrics or {}).get("split")) for e in entries if e.metrics}
    if len(rows_used) > 1:
        lines += ["**The rows were scored on different evaluation sets** (eval rows differ), so their ROUGE "
                  "is not directly comparable.", ""]
    lines += _published_lines(*_families(runs))
    lines += _sample_lines(baseline, best)
    lines += _errors_lines(best)
    for search in searches:
        lines += _search_lines(search)
    lines += ["## Plots", ""] + [f"- `{name}`" for name in figures] + [""]
    return lines


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> list[int]:
    # No bbox_inches="tight": the file keeps the size the figure was made with.
    fig.savefig(path, dpi=DPI)
    size = [int(round(v * DPI)) for v in fig.get_size_inches()]
    _pyplot().close(fig)
    return size


def plot_rouge(entries: list[Entry], families: list[str], path: Path) -> list[int]:
    """Grouped bars of ROUGE-1/2/Lsum: every row, then the published systems (hatched)."""
    plt = _pyplot()
    keys = ("rouge1", "rouge2", "rougeLsum")
    colors = plt.get_cmap("tab10").colors
    bars = [(e.label, [e.values[k] for k in keys], {"color": colors[i % len(colors)]})
            for i, e in enumerate(x for x in entries if x.values["rouge1"] is not None)]
    grays = ("0.55", "0.7", "0.85")
    for family in families:
        for i, p in enumerate(PUBLISHED[family]):
            scores = [{"mean": v} for v in (p.rouge1, p.rouge2, p.rougeL)]
            bars.append((f"{p.system}, {DATASET_TITLES[family]} (published, test set)", scores,
                         {"color": grays[i % len(grays)], "hatch": "//"}))
    fig, ax = plt.subplots(figsize=ROUGE_FIGSIZE, layout="constrained")
    width = 0.8 / max(len(bars), 1)
    for i, (label, scores, style) in enumerate(bars):
        x = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(keys))]
        means = [s["mean"] for s in scores]
        errors = None
        if "low" in scores[0]:
            errors = [[s["mean"] - s["low"] for s in scores], [s["high"] - s["mean"] for s in scores]]
        ax.bar(x, means, width, yerr=errors, capsize=2, label=label, edgecolor="black",
               linewidth=2.0 if label.endswith("(best)") else 0.8, **style)
    ax.set_xticks(range(len(keys)), [ROUGE_HEADERS[k] for k in keys])
    ax.set_ylabel("F1 (%)")
    ax.set_title("ROUGE (bars: mean; whiskers: 95% bootstrap interval; hatched: published)")
    if not bars:
        ax.text(0.5, 0.5, "no ROUGE in any eval_metrics.json", ha="center", va="center", transform=ax.transAxes)
    else:
        fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, path)


def plot_loss_curves(entries: list[Entry], path: Path) -> list[int]:
    """Train (solid) and validation (dashed) loss of every fine-tuned row against the optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=LOSS_FIGSIZE, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    drawn = 0
    for i, e in enumerate(x for x in entries if x.kind == "run"):
        train = [(r["step"], r["train/loss"]) for r in e.run.log if _number(r.get("train/loss")) is not None]
        val = [(r["step"], r["val/loss"]) for r in e.run.log if _number(r.get("val/loss")) is not None]
        width = 2.5 if e.role == "best" else 1.2
        if train:
            ax.plot(*zip(*train), color=colors[i % len(colors)], linewidth=width, label=f"{e.label} train")
        if val:
            ax.plot(*zip(*val), color=colors[i % len(colors)], linewidth=width, linestyle="--", marker="o",
                    label=f"{e.label} val")
        drawn += bool(train or val)
    return _finish_steps_plot(fig, ax, path, drawn, "loss per summary token", "Training and validation loss",
                              "no losses in any log.jsonl")


def plot_search_curves(searches: list[Search], path: Path) -> list[int]:
    """Each trial's validation loss against the step, from its own log.jsonl; the best trial thicker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=LOSS_FIGSIZE, layout="constrained")
    drawn = 0
    for search in searches:
        for trial_id, run in search.runs.items():
            val = [(r["step"], r["val/loss"]) for r in run.log if _number(r.get("val/loss")) is not None]
            if val:
                best = trial_id == search.best_trial
                ax.plot(*zip(*val), marker="o", linewidth=2.5 if best else 1.0,
                        label=f"{search.path.name}/{trial_id}" + (" (best)" if best else ""))
                drawn += 1
    return _finish_steps_plot(fig, ax, path, drawn, "validation loss", "Validation loss of each trial",
                              "no trial has a log.jsonl with validation losses")


def _finish_steps_plot(fig, ax, path: Path, drawn: int, ylabel: str, title: str, empty: str) -> list[int]:
    """Labels, a legend beside the axes (or a note when nothing was drawn), and the PNG."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        fig.legend(loc="outside right upper", fontsize="small")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def _log_scale(key: str, values: list[float]) -> bool:
    """Learning rates, and any values spanning more than 10x, are read on a log axis."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(values) and (
        key.split(".")[-1].endswith("lr") or max(positive) / min(positive) > 10)


def plot_search_objective(searches: list[Search], path: Path) -> list[int]:
    """The objective against each searched value: one row of panels per search, one panel per key."""
    plt = _pyplot()
    columns = max([len(s.keys) for s in searches] + [1])
    fig, axes = plt.subplots(len(searches), columns, squeeze=False, layout="constrained",
                             figsize=(OBJECTIVE_PANEL[0] * columns, OBJECTIVE_PANEL[1] * len(searches)))
    for row, search in enumerate(searches):
        scored = [t for t in search.trials if search.objective(t) is not None]
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(search.keys):
                ax.axis("off")
                continue
            key = search.keys[col]
            numbers = [_number(t.get(key)) for t in scored]
            if scored and all(v is not None for v in numbers):
                xs = numbers
                if _log_scale(key, xs):
                    ax.set_xscale("log")
            else:  # categorical values: one position per distinct value, in order of appearance
                labels = list(dict.fromkeys(t.get(key, "") for t in scored))
                xs = [labels.index(t.get(key, "")) for t in scored]
                ax.set_xticks(range(len(labels)), labels)
            ys = [search.objective(t) for t in scored]
            ax.scatter(xs, ys, color="tab:blue")
            for x, y, t in zip(xs, ys, scored):
                if t["trial_id"] == search.best_trial:
                    ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:red", linewidths=2,
                               label="best")
                    ax.legend(fontsize="small")
            ax.set_xlabel(key)
            ax.set_ylabel(f"{search.column} ({search.mode})")
            ax.set_title(search.path.name, fontsize="medium")
            if not scored:
                ax.text(0.5, 0.5, "no trial has an objective", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


# ----------------------------------------------------------------------------- entry point


def write_comparison(paths: list[str | Path], out_dir: str | Path, *, baseline: str | Path | None = None,
                     best: str | Path | None = None) -> dict:
    """Compare run and search folders into `out_dir`: report.md, results.csv, rouge.png,
    loss_curves.png and, for search folders, search_curves.png and search_objective.png.

    Returns what was written: the output folder, file names, figure sizes in pixels, the CSV rows
    and the baseline and best row names."""
    if not paths:
        raise ReportError("no run or search folder given")
    out_dir = Path(out_dir)
    inputs, seen = [], set()
    for p in paths:
        if Path(p).resolve() not in seen:  # the same folder given twice is one input
            seen.add(Path(p).resolve())
            inputs.append((p, read_input(p)))
    searches = [x for _, x in inputs if isinstance(x, Search)]
    runs, seen = [], set()
    for _, x in inputs:
        for run in x.runs.values() if isinstance(x, Search) else [x]:
            if run.path.resolve() not in seen:  # a trial's folder also given on its own is one row
                seen.add(run.path.resolve())
                runs.append(run)
    entries = _entries(runs)
    if not entries:
        raise ReportError(f"nothing to compare: no run in {[str(p) for p, _ in inputs]} has training or "
                          f"evaluation results")
    base_entry, best_entry = assign_roles(entries, baseline, best)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir}: exists and is not a folder; --out needs a folder")
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the report's plots need matplotlib: pip install matplotlib")
    hyperparameters = differing_keys(runs)
    families, _ = _families(runs)
    figure_names = ["rouge.png", "loss_curves.png"] + (["search_curves.png", "search_objective.png"]
                                                       if searches else [])
    # Everything read (articles included) before the first write.
    lines = _report_lines(entries, hyperparameters, [str(p) for p, _ in inputs], searches, runs, base_entry,
                          best_entry, figure_names)

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = csv_rows(entries, hyperparameters)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(hyperparameters), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "results.csv", buffer.getvalue())
    write_atomic(out_dir / "report.md", "\n".join(lines).rstrip("\n") + "\n")
    figures = {"rouge.png": plot_rouge(entries, families, out_dir / "rouge.png"),
               "loss_curves.png": plot_loss_curves(entries, out_dir / "loss_curves.png")}
    if searches:
        figures["search_curves.png"] = plot_search_curves(searches, out_dir / "search_curves.png")
        figures["search_objective.png"] = plot_search_objective(searches, out_dir / "search_objective.png")
    return {"out_dir": str(out_dir), "files": ["report.md", "results.csv", *figures], "figures": figures,
            "rows": rows, "baseline": base_entry.name if base_entry else None,
            "best": best_entry.name if best_entry else None}
