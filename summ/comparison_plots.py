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
OBJECTIVE_PANEL = (4.5, 3.5)


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


def _objective_panel(ax, search: Search, key: str) -> None:
    """One searched key: the objective of each scored trial against its value, the best one ringed."""
    scored = [t for t in search.trials if search.objective(t) is not None]
    numbers = [as_number(t.get(key)) for t in scored]
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
            ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, label="best")
            ax.legend(fontsize="small")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{search.column} ({search.mode})")
    ax.set_title(search.path.name, fontsize="medium")
    if not scored:
        ax.text(0.5, 0.5, "no trial has an objective", ha="center", va="center", transform=ax.transAxes)


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
    return _save(fig, path)
