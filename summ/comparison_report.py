"""report.md of `run.py report`: the table, then published results, a sample prediction, the best run's
error analysis and each search's trials, as markdown lines.
"""

from __future__ import annotations

from summ.comparison_rows import Entry
from summ.comparison_table import escape, markdown_table, relative_to
from summ.errors import excerpt
from summ.eval_report import error_summary_lines
from summ.files import json_records
from summ.published import DATASET_TITLES, PUBLISHED, TEST_ROWS, TRAIN_ROWS, dataset_family
from summ.runs import RunFolder, Search, as_number


def published_families(runs: list[RunFolder]) -> tuple[list[str], list[str]]:
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
    by_score = sorted(ids, key=lambda i: as_number(predictions[id(best)][i].get("rougeLsum")) or 0.0)
    row_id = by_score[(len(by_score) - 1) // 2]
    record = predictions[id(best)][row_id]
    article, why_not = _article(best, row_id, record)
    lines += [f"Example `{row_id}`, at {best.name}'s median ROUGE-Lsum.", "",
              f"- **Article:** {escape(excerpt(article)) if article is not None else '(not shown: ' + why_not + ')'}",
              f"- **Reference:** {escape(record.get('reference', ''))}"]
    for e in shown:
        p = predictions[id(e)][row_id]
        score = as_number(p.get("rougeLsum"))
        lines.append(f"- **{escape(e.label)}:** {escape(p.get('prediction', '')) or '(empty)'}"
                     + (f" (ROUGE-Lsum {score:.1f})" if score is not None else ""))
    return lines + [""]


def _errors_lines(best: Entry | None, out_dir) -> list[str]:
    lines = ["## Error analysis of the best run", ""]
    errors = (best.metrics or {}).get("errors") if best is not None else None
    if not errors or not errors.get("n"):
        return lines + [f"No error analysis: {best.name if best else 'no best run'} has no \"errors\" in its "
                        f"eval_metrics.json.", ""]
    return lines + [f"{best.name}, {errors['n']} examples ({relative_to(best.eval_dir / 'errors.jsonl', out_dir)} "
                    f"per example).", "",
                    *error_summary_lines(errors)]


def _search_lines(search: Search, out_dir) -> list[str]:
    shown = [c for c in ("steps", "best_val_loss", "last_val_loss", "rougeLsum", "wall_s", "peak_gib")
             if c in (search.trials[0] if search.trials else {})]
    headers = ["trial", "status", *search.keys, *shown, "row above", "best"]
    lines = [f"## Search `{search.path.name}`", "",
             f"{len(search.trials)} trials; objective {search.metric} ({search.mode}imize, column "
             f"`{search.column}`); best trial: {search.best_trial if search.best_trial is not None else 'none'}"
             + (f" (its config: {relative_to(search.path / 'best.json', out_dir)})"
                if (search.path / "best.json").is_file() else "")
             + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for t in search.trials:
        cells = [t["trial_id"], t["status"]]
        for column in [*search.keys, *shown]:
            value = as_number(t.get(column))
            cells.append(f"{value:.4g}" if value is not None else (t.get(column) or "n/a"))
        run = search.runs.get(t["trial_id"])
        cells += [run.name if run else "none (no run folder)", "yes" if t["trial_id"] == search.best_trial else ""]
        lines.append("| " + " | ".join(escape(c) for c in cells) + " |")
    return lines + [""]


def _train_loss_text(entries: list[Entry]) -> str:
    """What the train loss column is the mean of, in steps (each run's log.log_every, capped by its steps)."""
    steps = sorted({e.values["train_loss_steps"] for e in entries
                    if e.kind == "run" and e.values.get("train_loss_steps") is not None})
    if not steps:
        return "train loss: none logged"
    span = (f"{steps[0]} optimizer step" + ("s" if steps[0] > 1 else "")) if len(steps) == 1 else \
        f"{'/'.join(map(str, steps))} optimizer steps by run (results.csv `train_loss_steps`)"
    return (f"train loss (last log window): the mean loss of the last {span}, as log.jsonl's last `train/loss` "
            f"(metrics.json's `last_step_train_loss` is the last step alone)")


def report_lines(entries: list[Entry], hyperparameters: list[str], inputs: list[str], searches: list[Search],
                 runs: list[RunFolder], baseline: Entry | None, best: Entry | None, figures: list[str],
                 out_dir, baseline_note: str = "") -> list[str]:
    """report.md, line by line. Reads the sample's article (the run's data) when predictions.jsonl
    lacks it, so it runs before anything is written. Paths are written relative to `out_dir`."""
    lines = ["# Comparison", "", "Inputs: " + ", ".join(f"`{relative_to(p, out_dir)}`" for p in inputs) + ".", "",
             f"Baseline: {baseline.name if baseline else 'none'}; best: {best.name if best else 'none'}.", ""]
    if baseline_note:
        lines += [baseline_note, ""]
    if hyperparameters:
        lines += ["Config keys shown: those that differ between the runs (`log.*` left out).", ""]
    elif len(runs) > 1:
        lines += ["The runs share one config (`log.*` left out).", ""]
    lines += markdown_table(entries, hyperparameters)
    lines += [
        "",
        "ROUGE F1 mean [95% bootstrap interval] on the eval rows; val loss: mean per summary + EOS token over "
        "the val loss rows (of split), from the row's evaluation (eval_metrics.json), else training's last "
        "validation (metrics.json / log.jsonl), the same figure for an adapter of the last step; perplexity: "
        f"exp(val loss); {_train_loss_text(entries)}; stopped by itself: EOS or a stop string after some text "
        "(an empty summary does not count); train time and tokens/s: the training steps as log.jsonl timed them "
        "(evaluation excluded); peak GPU memory allocated while training. –: does not apply to the row; n/a: "
        "not recorded.",
        "",
    ]
    rows_used = {(e.values["eval_rows"], (e.metrics or {}).get("split")) for e in entries if e.metrics}
    if len(rows_used) > 1:
        lines += ["**The rows were scored on different evaluation sets** (eval rows differ), so their ROUGE "
                  "is not directly comparable.", ""]
    lines += _published_lines(*published_families(runs))
    lines += _sample_lines(baseline, best)
    lines += _errors_lines(best, out_dir)
    for search in searches:
        lines += _search_lines(search, out_dir)
    lines += ["## Plots", ""] + [f"- `{name}`" for name in figures] + [""]
    return lines
