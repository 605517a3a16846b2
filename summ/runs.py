"""Reading run folders and search folders, as `run.py report` takes them.

A run folder holds config.json and its results (metrics.json, log.jsonl, eval/, zero_shot/, lead/); a
search folder holds trials.csv, search.json and each trial's own run folder. They are only read, and
every file is checked here, so a wrong path is refused before the report writes anything. A run
folder whose result files are damaged is skipped with a warning, so one broken run does not cost the
report of the others; a report with nothing left is refused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from summ.files import json_records

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """An input folder is not a run or search folder, or a file in it cannot be read."""


class BrokenRun(ReportError):
    """A run folder whose result files cannot be read: the report skips it and shows the rest."""


# Row kind -> the subfolder of a run folder holding that evaluation.
EVAL_SUBDIRS = {"run": "eval", "zero-shot": "zero_shot", "lead": "lead"}
_EXPECTED = ("a run folder (config.json and metrics.json, log.jsonl or an eval/, zero_shot/ or lead/ "
             "eval_metrics.json) or a search folder (trials.csv and search.json)")
# A search's objective names a metric; trials.csv keeps it under this column (`run.py tune` ranks
# trials by their last validation loss, the model it would keep).
OBJECTIVE_COLUMNS = {"val_loss": "last_val_loss"}


@dataclass
class RunFolder:
    path: Path
    name: str
    config: dict
    train: dict | None  # metrics.json
    log: list[dict]  # log.jsonl
    evals: dict[str, dict]  # row kind -> that subfolder's eval_metrics.json


@dataclass
class Search:
    path: Path
    metric: str
    mode: str
    column: str  # the trials.csv column holding the objective
    keys: list[str]  # searched config keys
    space: dict  # search.json's space: key -> {form: values}
    trials: list[dict]  # trials.csv rows
    runs: dict[str, RunFolder]  # trial_id -> its run folder, where it has one
    best_trial: str | None

    def objective(self, trial: dict) -> float | None:
        return as_number(trial.get(self.column))


def as_number(text) -> float | None:
    """A finite float from a value as read (a CSV cell, a JSON value), else None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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


def _has_results(path: Path) -> bool:
    return ((path / "metrics.json").is_file() or (path / "log.jsonl").is_file()
            or any((path / sub / "eval_metrics.json").is_file() for sub in EVAL_SUBDIRS.values()))


def _read_run(path: Path, name: str) -> RunFolder:
    if not _has_results(path):
        raise ReportError(f"{path}: has config.json but no results; a run folder needs metrics.json, log.jsonl "
                          f"or an eval/, zero_shot/ or lead/ eval_metrics.json")
    try:
        evals = {kind: _read_json(path / sub / "eval_metrics.json") for kind, sub in EVAL_SUBDIRS.items()
                 if (path / sub / "eval_metrics.json").is_file()}
        return RunFolder(path=path, name=name, config=_read_json(path / "config.json"),
                         train=_read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None,
                         log=_read_log(path / "log.jsonl"), evals=evals)
    except ReportError as e:
        raise BrokenRun(str(e)) from None


def _read_trials(path: Path) -> tuple[list[dict], list[str]]:
    """trials.csv's rows and columns."""
    try:
        with open(path / "trials.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"{path / 'trials.csv'}: cannot read it as CSV ({e})") from None


def _read_search(path: Path) -> Search:
    if not (path / "search.json").is_file():
        raise ReportError(f"{path}: has trials.csv but no search.json; a search folder needs both")
    spec = _read_json(path / "search.json")
    metric, mode = spec.get("metric"), spec.get("mode")
    if not isinstance(metric, str) or mode not in ("min", "max"):
        raise ReportError(f"{path / 'search.json'}: expected \"metric\" (a trials.csv column) and \"mode\" "
                          f"(\"min\" or \"max\"), got metric={metric!r}, mode={mode!r}")
    trials, columns = _read_trials(path)
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
            try:
                runs[trial["trial_id"]] = _read_run(folder, f"{path.name}/{trial['trial_id']}")
            except BrokenRun as e:
                log.warning("report: trial %s skipped: %s", trial["trial_id"], e)
    if "best_trial" in spec:  # the search's own choice, by its run folder
        chosen = _under(path, spec["best_trial"]) if spec["best_trial"] else None
        best = next((t for t, folder in folders.items() if folder == chosen), None)
    else:  # as `run.py tune` chooses: the best objective among the trials that ran their whole budget
        done = [t for t in trials if t["status"] == "completed" and as_number(t.get(column)) is not None]
        best = (min if mode == "min" else max)(done, key=lambda t: as_number(t[column]))["trial_id"] if done else None
    return Search(path=path, metric=metric, mode=mode, column=column, keys=keys, space=space, trials=trials,
                  runs=runs, best_trial=best)


def _under(folder: Path, path: str) -> Path:
    """`path` as written in a search's files: relative to the search folder, or absolute (searches made
    before paths were stored relative). An absolute trial folder that is gone, in a search folder that
    was moved since, is found under the folder's own trials/."""
    written = (folder / path).resolve()
    moved = folder.resolve() / "trials" / written.name
    if Path(path).is_absolute() and not written.exists() and moved.is_dir():
        return moved
    return written


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


def read_inputs(paths: list[str | Path]) -> tuple[list[tuple[str | Path, RunFolder | Search]], list[RunFolder]]:
    """Each input once, as (path as given, what it is), and every run folder they hold once, in order:
    a run given itself, or each trial of a search that has its own run folder."""
    inputs, seen, skipped = [], set(), []
    for p in paths:
        if Path(p).resolve() not in seen:  # the same folder given twice is one input
            seen.add(Path(p).resolve())
            try:
                inputs.append((p, read_input(p)))
            except BrokenRun as e:  # one damaged run does not cost the report of the others
                log.warning("report: skipped: %s", e)
                skipped.append(str(e))
    if not inputs:
        raise ReportError(f"nothing to report: every input was skipped ({'; '.join(skipped)})")
    runs, seen = [], set()
    for _, x in inputs:
        for run in x.runs.values() if isinstance(x, Search) else [x]:
            if run.path.resolve() not in seen:  # a trial's folder also given on its own is one row
                seen.add(run.path.resolve())
                runs.append(run)
    return inputs, runs
