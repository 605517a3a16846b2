"""The rows of a comparison: each run's fine-tuned evaluation, its zero-shot one and its LEAD baseline,
with their names, their numbers, and which row is the baseline and which the best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from summ.config import flat_config
from summ.errors import stopped_by_itself_count
from summ.files import json_records
from summ.rouge import ROUGE_KEYS
from summ.runs import EVAL_SUBDIRS, ReportError, RunFolder, as_number

# Which sections of a run's config describe a row of each kind: a zero-shot row had no training, and
# LEAD depends on the data alone.
_CONFIG_SECTIONS = {"run": None, "zero-shot": ("model", "quant", "data", "eval"), "lead": ("data",)}


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

    def predictions(self) -> list[dict] | None:
        """predictions.jsonl's records, None where there is none."""
        path = self.eval_dir / "predictions.jsonl"
        return list(json_records(path)) if path.is_file() else None

    def scored_rows(self) -> tuple | None:
        """What the row's ROUGE was measured on: (split, generated rows, loss rows, the ids of
        predictions.jsonl); None without an evaluation. Loss rows and ids are None where not recorded."""
        m = self.metrics
        if m is None:
            return None
        predictions = self.predictions()
        ids = tuple(str(p.get("id")) for p in predictions) if predictions is not None else None
        return m.get("split"), m.get("generated_rows"), m.get("loss_rows"), ids

    def rows_text(self) -> str:
        m = self.metrics or {}
        loss = m.get("loss_rows")
        return f"{m.get('generated_rows', '?')} {m.get('split', '?')} rows" + (
            f", loss on {loss}" if loss is not None and loss != m.get("generated_rows") else "")


def same_rows(a: Entry, b: Entry) -> bool:
    """Whether two rows were scored on the same articles: the same split and row counts, and the same
    ids where both kept predictions.jsonl. (LEAD computes no loss: its loss rows are not compared.)"""
    ra, rb = a.scored_rows(), b.scored_rows()
    if ra is None or rb is None or ra[:2] != rb[:2]:
        return False
    if None not in (ra[2], rb[2]) and ra[2] != rb[2]:
        return False
    return None in (ra[3], rb[3]) or ra[3] == rb[3]


def config_text(config: dict) -> dict[str, str]:
    """`section.key` -> value as text, without `log.*` (where a run writes, not how it ran)."""
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for key, value in flat_config(config).items() if not key.startswith("log.")}


def differing_keys(runs: list[RunFolder]) -> list[str]:
    """Config keys whose value is not the same in every run (a key a run lacks counts as differing)."""
    flats = [config_text(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({f.get(k) for f in flats}) > 1]


def config_cell(entry: Entry, key: str) -> str | None:
    """The row's value of a config key; None where the key does not describe this kind of row."""
    sections = _CONFIG_SECTIONS[entry.kind]
    if sections is not None and key.split(".", 1)[0] not in sections:
        return None
    return config_text(entry.run.config).get(key, "n/a")


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
    stopped = stopped_by_itself_count(m, entry.predictions()) if entry.kind != "lead" and m else None
    values = {"eval_rows": m.get("generated_rows"),
              "stopped_by_itself_share": stopped / max(m["generated_rows"], 1) if stopped is not None else None,
              "repeats_trigram_share": m.get("errors", {}).get("repeats_trigram_share"),
              "loss_rows": None}
    for key in ROUGE_KEYS:
        values[key] = m["rouge"][key] if "rouge" in m else None
    if entry.kind == "run":
        # The eval pipeline's loss where there is one, so a fine-tuned row and its zero-shot row are
        # measured the same way; otherwise the last validation pass of training.
        # A trial the scheduler stopped has no metrics.json: its last logged validation is its loss.
        validated = [r for r in run.log if as_number(r.get("val/loss")) is not None]
        last = validated[-1] if validated else {}
        if "val_loss" in m:
            values["val_loss"], values["perplexity"] = m["val_loss"], m.get("val_perplexity")
            values["loss_rows"] = _loss_rows(m.get("loss_rows"), m.get("split"))
        else:
            values["val_loss"] = train.get("final_val_loss", last.get("val/loss"))
            values["perplexity"] = train.get("final_val_perplexity", last.get("val/perplexity"))
            used = (train.get("data", {}).get("eval") or {}).get("used", train.get("eval_rows"))
            data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
            split = data.get("eval_split")
            values["loss_rows"] = _loss_rows(used, split) if values["val_loss"] is not None else None
        values["train_loss"], values["train_loss_steps"] = _train_loss(run, train)
        values["train_seconds"], values["tokens_per_s"] = _log_totals(run.log)
        values["peak_gib"] = train.get("memory/peak_allocated_gib")
    elif entry.kind == "zero-shot":
        values["val_loss"], values["perplexity"] = m.get("val_loss"), m.get("val_perplexity")
        values["loss_rows"] = _loss_rows(m.get("loss_rows"), m.get("split"))
    return values


def _loss_rows(rows, split) -> str | None:
    return f"{rows} {split}" if rows is not None and split else None


def _train_loss(run: RunFolder, train: dict) -> tuple[float | None, int | None]:
    """The last logged training loss and how many optimizer steps it is the mean of: log.jsonl's last
    `train/loss`, the mean over the last log.log_every steps (steadier than one step alone). Without a
    log, metrics.json's loss of the last step (`last_step_train_loss`; `final_train_loss` before)."""
    logged = [r for r in run.log if as_number(r.get("train/loss")) is not None]
    if logged:
        log_config = run.config.get("log") if isinstance(run.config.get("log"), dict) else {}
        every = log_config.get("log_every")
        steps = min(every, logged[-1]["step"]) if isinstance(every, int) and every > 0 else None
        return logged[-1]["train/loss"], steps
    last = train.get("last_step_train_loss", train.get("final_train_loss"))
    return last, 1 if last is not None else None


def _lead_k(metrics: dict) -> int | str:
    if isinstance(metrics.get("k"), int):
        return metrics["k"]
    return str(metrics.get("baseline", "lead-k")).rsplit("-", 1)[-1]


def entries_of(runs: list[RunFolder]) -> list[Entry]:
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


def assign_roles(entries: list[Entry], baseline=None, best=None) -> tuple[Entry | None, Entry | None, str]:
    """The baseline, the best row, and a sentence on how the baseline relates to the best.

    Best (default): the fine-tuned row with the lowest validation loss. Baseline (default): a zero-shot
    row scored on the same rows as the best (its own run's first), else a LEAD row on those rows; a
    row scored on other rows is never taken silently: without one on the same rows there is no
    baseline, and the sentence says why. A baseline the user names is kept, and the sentence says
    when its rows differ from the best's."""
    best_entry = _pick(entries, best, "--best") if best is not None else min(
        (e for e in entries if e.kind == "run" and e.values["val_loss"] is not None),
        key=lambda e: e.values["val_loss"], default=None)
    note = ""
    if baseline is not None:
        base_entry = _pick(entries, baseline, "--baseline")
        if best_entry is not None and None not in (base_entry.metrics, best_entry.metrics) \
                and not same_rows(base_entry, best_entry):
            note = (f"{base_entry.name} ({base_entry.rows_text()}) and {best_entry.name} "
                    f"({best_entry.rows_text()}) were not scored on the same rows: their ROUGE is not directly "
                    f"comparable.")
    elif best_entry is not None and best_entry.metrics is not None:
        candidates = [e for kind in ("zero-shot", "lead") for own in (True, False) for e in entries
                      if e.kind == kind and (e.run is best_entry.run) == own]
        base_entry = next((e for e in candidates if same_rows(e, best_entry)), None)
        if base_entry is None and candidates:
            note = (f"No baseline: no zero-shot or LEAD row was scored on the rows of {best_entry.name} "
                    f"({best_entry.rows_text()}; {', '.join(f'{e.name}: {e.rows_text()}' for e in candidates)}); "
                    f"evaluate one on those rows or name one with --baseline.")
    else:
        # No evaluated best row to compare with: the first run's zero-shot row shows where the model started.
        base_entry = next((e for kind in ("zero-shot", "lead") for e in entries if e.kind == kind), None)
    if base_entry is not None and base_entry is best_entry:
        raise ReportError(f"--baseline and --best both name {base_entry.name}; pick two different rows")
    for e, role in ((base_entry, "baseline"), (best_entry, "best")):
        if e is not None:
            e.role = role
    return base_entry, best_entry, note
