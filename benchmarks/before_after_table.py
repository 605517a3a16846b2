"""The table of benchmarks/before_after.sh: each runner's non-pad tokens/s in every run of the older
tree and of this one, and the ratio of their medians (after / before).

    python benchmarks/before_after_table.py OUT     # OUT holds before-N/ and after-N/ bench_train.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import header  # noqa: E402


def runs_of(out: Path, tree: str) -> list[dict]:
    """The tree's bench_train.json files, in run order (before-1, before-2, ...)."""
    files = sorted(out.glob(f"{tree}-*/bench_train.json"), key=lambda p: int(p.parent.name.rsplit("-", 1)[1]))
    return [json.loads(f.read_text()) for f in files]


def speeds(runs: list[dict]) -> dict[tuple[str, str], list[float | None]]:
    """(model, runner) -> its non-pad tokens/s in each run (None where that run failed or lacks it)."""
    keys = [(m, r) for run in runs for m, rows in run["models"].items() for r in rows]
    return {key: [run["models"].get(key[0], {}).get(key[1], {}).get("non_pad_tokens_per_s") for run in runs]
            for key in dict.fromkeys(keys)}


def table(out: Path) -> str:
    before, after = runs_of(out, "before"), runs_of(out, "after")
    if not before or not after:
        raise SystemExit(f"error: {out}: expected before-N/bench_train.json and after-N/bench_train.json")
    lines = header(after[0])[:1] + [f"Before: `{before[0]['command']}`", f"After: `{after[0]['command']}`", "",
                                     "| model | runner | before tok/s, each run | after tok/s, each run | after / before (medians) |",
                                     "|---|---|---|---|---|"]
    old, new = speeds(before), speeds(after)
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, []), new.get(key, [])
        shown = [", ".join("failed" if x is None else f"{x:,.0f}" for x in xs) or "-" for xs in (a, b)]
        done = [[x for x in xs if x is not None] for xs in (a, b)]
        ratio = f"{statistics.median(done[1]) / statistics.median(done[0]):.3f}" if all(done) else "-"
        lines.append(f"| {key[0]} | {key[1]} | {shown[0]} | {shown[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1])), end="")
