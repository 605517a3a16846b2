"""`run.py report`: runs and searches side by side, with their baselines and published results.

Wires the parts together: summ.runs reads the folders, summ.comparison_rows makes the rows,
summ.comparison_table and summ.comparison_report write results.csv and report.md, and
summ.comparison_plots the PNGs. Every input is read and checked before anything is written, so a
wrong path costs nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from summ.comparison_plots import plot_loss_curves, plot_rouge, plot_search_curves, plot_search_objective
from summ.comparison_report import published_families, report_lines
from summ.comparison_rows import assign_roles, differing_keys, entries_of
from summ.comparison_table import csv_rows, csv_text
from summ.files import write_atomic
from summ.runs import ReportError, Search, read_inputs


def write_comparison(paths: list[str | Path], out_dir: str | Path, *, baseline: str | Path | None = None,
                     best: str | Path | None = None) -> dict:
    """Compare run and search folders into `out_dir`: report.md, results.csv, rouge.png,
    loss_curves.png and, for search folders, search_curves.png and search_objective.png.

    Returns what was written: the output folder, file names, figure sizes in pixels, the CSV rows
    and the baseline and best row names."""
    if not paths:
        raise ReportError("no run or search folder given")
    out_dir = Path(out_dir)
    inputs, runs = read_inputs(paths)
    searches = [x for _, x in inputs if isinstance(x, Search)]
    entries = entries_of(runs)
    if not entries:
        raise ReportError(f"nothing to compare: no run in {[str(p) for p, _ in inputs]} has training or "
                          f"evaluation results")
    base_entry, best_entry, baseline_note = assign_roles(entries, baseline, best)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir}: exists and is not a folder; --out needs a folder")
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the report's plots need matplotlib: pip install matplotlib")
    hyperparameters = differing_keys(runs)
    families, _ = published_families(runs)
    figure_names = ["rouge.png", "loss_curves.png"] + (["search_curves.png", "search_objective.png"]
                                                       if searches else [])
    # Everything read (articles included) before the first write.
    lines = report_lines(entries, hyperparameters, [str(p) for p, _ in inputs], searches, runs, base_entry,
                         best_entry, figure_names, out_dir, baseline_note)

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = csv_rows(entries, hyperparameters, out_dir)
    write_atomic(out_dir / "results.csv", csv_text(rows, hyperparameters))
    write_atomic(out_dir / "report.md", "\n".join(lines).rstrip("\n") + "\n")
    figures = {"rouge.png": plot_rouge(entries, families, out_dir / "rouge.png"),
               "loss_curves.png": plot_loss_curves(entries, out_dir / "loss_curves.png")}
    if searches:
        figures["search_curves.png"] = plot_search_curves(searches, out_dir / "search_curves.png")
        figures["search_objective.png"] = plot_search_objective(searches, out_dir / "search_objective.png")
    return {"out_dir": str(out_dir), "files": ["report.md", "results.csv", *figures], "figures": figures,
            "rows": rows, "baseline": base_entry.name if base_entry else None,
            "best": best_entry.name if best_entry else None, "baseline_note": baseline_note}
