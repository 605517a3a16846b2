"""The table of benchmarks/quality_figures.sh: LEAD-k, the zero-shot base model, the recipe under each
decoding scored and one row per lever (with each decoding scored for it), on the same validation rows.

    python benchmarks/ablation_table.py OUT recipe raw-prompt attention-only ...

OUT holds one folder per run (its eval/, zero_shot/ and lead/, and one folder per further decoding,
each with eval_metrics.json) and one `<name>.log` per command (the wall time is read from `time`'s
`real` line). A decoding's row is labelled from the settings its eval_metrics.json records.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from summ.files import json_records  # noqa: E402
from summ.rouge import ROUGE_KEYS  # noqa: E402

LEVERS = {"raw-prompt": "the dataset's raw prompt instead of the chat template",
          "attention-only": "LoRA on attention only (q, k, v, o)", "one-epoch": "1 epoch instead of 3",
          "max-length-256": "256 tokens instead of 512", "max-length-768": "768 tokens instead of 512",
          "max-length-1024": "1024 tokens instead of 512", "five-epochs": "5 epochs instead of 3",
          "lr-1e-3": "learning rate 1e-3 instead of 5e-4", "rank-32": "LoRA rank 32 (alpha 64) instead of 16",
          "all-three": "5 epochs, learning rate 1e-3, LoRA rank 32"}


def wall_time(log: Path) -> str:
    found = re.findall(r"^real\s+(\d+)m([\d.]+)s", log.read_text(), re.M) if log.is_file() else []
    if not found:
        return "-"
    minutes, seconds = found[-1]
    return f"{int(minutes) * 60 + float(seconds):.0f} s"


def flag_share(records: list[dict], flag: str) -> str:
    # Records saved before the flag existed (errors.jsonl of older runs) have no value to show.
    if not records or flag not in records[0]:
        return "-"
    return f"{100 * sum(bool(e[flag]) for e in records) / len(records):.1f}%"


def row(label: str, folder: Path, log: Path, train_dir: Path | None = None) -> str:
    metrics_file = folder / "eval_metrics.json"
    if not metrics_file.is_file():
        return f"| {label} | missing: {metrics_file} |" + " |" * 9
    m = json.loads(metrics_file.read_text())
    r = m["rouge"]
    rouge = [f"{r['rouge1']['mean']:.2f} [{r['rouge1']['low']:.2f}, {r['rouge1']['high']:.2f}]"] + \
        [f"{r[k]['mean']:.2f}" for k in ROUGE_KEYS[1:]]
    val_loss = f"{m['val_loss']:.4f}" if "val_loss" in m else "-"
    stopped = f"{100 * m['stopped_by_itself_share']:.1f}%" if "stopped_by_itself_share" in m else "-"
    errors = folder / "errors.jsonl"
    records = json_records(errors) if errors.is_file() else []
    repeating, looping = flag_share(records, "repeats_trigram"), flag_share(records, "degenerate_repetition")
    generation = m.get("generation", {})
    seconds = f"{generation['seconds']:.0f} s" if "seconds" in generation else "-"
    train = wall_time(log) if train_dir else "-"
    return (f"| {label} | {val_loss} | " + " | ".join(rouge)
            + f" | {stopped} | {repeating} | {looping} | {seconds} | {train} |")


def decodings(run: Path) -> list[Path]:
    """The run's evaluations besides its own (eval/) and the baselines, by folder name."""
    return sorted(f for f in run.iterdir() if f.name not in ("eval", "zero_shot", "lead")
                  and (f / "eval_metrics.json").is_file()) if run.is_dir() else []


def decoding_label(folder: Path) -> str:
    """How the summaries of `folder` were decoded, from its eval_metrics.json."""
    if not (folder / "eval_metrics.json").is_file():
        return folder.name
    g = json.loads((folder / "eval_metrics.json").read_text()).get("generation", {})
    beams = g.get("num_beams", 1)
    parts = ["greedy" if beams == 1 else f"{beams} beams"]
    if beams > 1 and g.get("length_penalty", 1.0) != 1.0:
        parts.append(f"length penalty {g['length_penalty']}")
    if g.get("no_repeat_ngram_size"):
        scope = g.get("repetition_scope", "sequence")
        parts.append(f"no repeated {g['no_repeat_ngram_size']}-gram "
                     + ("in the summary" if scope == "summary" else "(article included, as transformers)")
                     + (", case ignored" if g.get("no_repeat_ignore_case") else ""))
    if g.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"repetition penalty {g['repetition_penalty']}")
    low = g.get("min_new_tokens", 0)
    parts.append(f"{low}-{g.get('max_new_tokens')} tokens" if low else f"<= {g.get('max_new_tokens')} tokens")
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("recipe", help="the recipe run's folder name")
    p.add_argument("levers", nargs="*", help="folder names of the runs with one lever switched off")
    a = p.parse_args()
    out = a.out
    recipe = out / a.recipe
    lead = json.loads((recipe / "lead" / "eval_metrics.json").read_text())["baseline"] \
        if (recipe / "lead" / "eval_metrics.json").is_file() else "lead"
    print("| run | val loss | ROUGE-1 [95% CI] | ROUGE-2 | ROUGE-L | ROUGE-Lsum | stopped by itself | "
          "summaries repeating a trigram | summaries looping (a trigram 3+ times) | generation | "
          "train + greedy eval |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(row(lead.upper(), recipe / "lead", out / "lead.log"))
    print(row("zero-shot (chat template)", recipe / "zero_shot", out / "zero-shot.log"))
    for name in [a.recipe, *a.levers]:
        run = out / name
        label = "recipe" if name == a.recipe else f"recipe, {LEVERS.get(name, name)}"
        print(row(f"{label}, {decoding_label(run / 'eval')}", run / "eval", out / f"{name}.log", run))
        for folder in decodings(run):
            print(row(f"{label}, {decoding_label(folder)}", folder, out / f"{name}-{folder.name}.log"))

if __name__ == "__main__":
    main()
