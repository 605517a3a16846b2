"""The PNG plots of `run.py report`: ROUGE bars, loss curves, and for searches each trial's validation
loss and the objective against each searched value.

matplotlib is imported on the first plot, so reading and checking the inputs never needs it.
"""

from __future__ import annotations

from pathlib import Path

from summ.comparison_rows import Entry
from summ.published import DATASET_TITLES, PUBLISHED
from summ.rouge import PAPER_KEYS, ROUGE_NAMES
from summ.runs import Search, as_number

DPI = 100
LOSS_FIGSIZE = (10.0, 5.5)
ROUGE_FIGSIZE = (11.0, 5.5)
OBJECTIVE_PANEL = (5.0, 4.0)


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
    colors = plt.get_cmap("tab10").colors
    bars = [(e.label, [e.values[k] for k in PAPER_KEYS], {"color": colors[i % len(colors)]})
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
        x = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(PAPER_KEYS))]
        means = [s["mean"] for s in scores]
        errors = None
        if "low" in scores[0]:
            errors = [[s["mean"] - s["low"] for s in scores], [s["high"] - s["mean"] for s in scores]]
        ax.bar(x, means, width, yerr=errors, capsize=2, label=label, edgecolor="black",
               linewidth=2.0 if label.endswith("(best)") else 0.8, **style)
    ax.set_xticks(range(len(PAPER_KEYS)), [ROUGE_NAMES[k] for k in PAPER_KEYS])
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
        train = [(r["step"], r["train/loss"]) for r in e.run.log if as_number(r.get("train/loss")) is not None]
        val = [(r["step"], r["val/loss"]) for r in e.run.log if as_number(r.get("val/loss")) is not None]
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
            val = [(r["step"], r["val/loss"]) for r in run.log if as_number(r.get("val/loss")) is not None]
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


def _categories(search: Search, key: str) -> list[str] | None:
    """The labels of a key searched over listed values ("choice", "grid"), in the order listed, then any
    other value a trial holds; None for a range ("uniform", "loguniform") whose values are all numbers.
    A choice of [1, 2] is two categories, not an axis from 1 to 2 with nothing between."""
    spec = search.space.get(key)
    form, listed = next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else (None, None)
    values = [t.get(key, "") for t in search.trials]
    if form in ("loguniform", "uniform") and all(as_number(v) is not None for v in values):
        return None
    if form is None and values and all(as_number(v) is not None for v in values):
        return None
    labels = [_category(v) for v in (listed if isinstance(listed, list) else [])]
    return list(dict.fromkeys(labels + [_category(v) for v in values]))


def _category(value) -> str:
    """A listed value and the same value read back from trials.csv as one label (2, "2", 2.0 -> "2")."""
    number = as_number(value)
    if number is not None and not isinstance(value, bool):
        return f"{number:g}"
    return str(value)


def _objective_panel(ax, search: Search, key: str) -> None:
    """One searched key: every trial at its value. Trials that ran their budget are filled dots, stopped
    ones hollow; a trial without the objective (stopped before ROUGE, or failed) is an x below the
    others; the best one is ringed. A range is shown whole, so the samples read against it."""
    from matplotlib.ticker import MaxNLocator

    categories = _categories(search, key)
    if categories is None:
        xs = [as_number(t.get(key)) for t in search.trials]
        form, bounds = next(iter(search.space.get(key, {"": None}).items()))
        if _log_scale(key, xs + (bounds if form == "loguniform" else [])):
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        if form in ("loguniform", "uniform") and isinstance(bounds, list) and len(bounds) == 2:
            low, high = min(bounds + xs), max(bounds + xs)
            pad = (high / low) ** 0.04 if form == "loguniform" else (high - low) * 0.04
            ax.set_xlim(*((low / pad, high * pad) if form == "loguniform" else (low - pad, high + pad)))
        ax.tick_params(axis="x", labelrotation=30)
    else:
        xs = [categories.index(_category(t.get(key, ""))) for t in search.trials]
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    scores = [search.objective(t) for t in search.trials]
    known = [y for y in scores if y is not None]
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    missing_y = low - 0.15 * ((high - low) or abs(low) * 0.05 or 1.0)
    drawn = set()

    def mark(x, y, label, **style):
        ax.scatter([x], [y], label=None if label in drawn else label, zorder=3, **style)
        drawn.add(label)

    for x, y, t in zip(xs, scores, search.trials):
        if y is None:
            mark(x, missing_y, f"no {search.column} ({t['status']})", marker="x", color="tab:gray")
        elif t["status"] == "completed":
            mark(x, y, "ran its budget", color="tab:blue")
        else:
            mark(x, y, t["status"], facecolors="none", edgecolors="tab:orange", linewidths=1.5)
        if t["trial_id"] == search.best_trial and y is not None:
            mark(x, y, "best", s=160, facecolors="none", edgecolors="tab:red", linewidths=2)
    if None in scores and known:  # the x marks sit below this line: their height is no score
        ax.axhline((missing_y + low) / 2, color="tab:gray", linestyle=":", linewidth=1)
    ax.set_xlabel(key + (" (listed values)" if categories is not None else ""))
    ax.set_ylabel(f"{search.column} ({search.mode})")
    ax.set_title(f"{search.path.name}: {len(search.trials)} trials", fontsize="medium")
    if not search.trials:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)


def plot_search_objective(searches: list[Search], path: Path) -> list[int]:
    """The objective against each searched value: one row of panels per search, one panel per key."""
    plt = _pyplot()
    columns = max([len(s.keys) for s in searches] + [1])
    fig, axes = plt.subplots(len(searches), columns, squeeze=False, layout="constrained",
                             figsize=(OBJECTIVE_PANEL[0] * columns, OBJECTIVE_PANEL[1] * len(searches)))
    for row, search in enumerate(searches):
        for col in range(columns):
            if col < len(search.keys):
                _objective_panel(axes[row][col], search, search.keys[col])
            else:
                axes[row][col].axis("off")
    # One legend below the panels (every panel marks the same trials), clear of the points.
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 4),
                   fontsize="small")
    return _save(fig, path)
