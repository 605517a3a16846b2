"""The human-readable report of one evaluation (eval_report.md), and the error-analysis table that
`run.py report` shows for its best run too."""

from __future__ import annotations

from pathlib import Path

from summ.errors import LENGTH_BUCKETS, excerpt, stopped_by_itself_count, worst_examples
from summ.files import write_atomic
from summ.rouge import ROUGE_KEYS, ROUGE_LONG_NAMES, rouge_cell


def error_summary_lines(e: dict) -> list[str]:
    """The aggregate error analysis (`summ.errors.aggregate_errors` of at least one example) as a
    markdown table and a line of means, ending with a blank line.

    A signal that the analysis lacks (one saved by an older version of summ) reads "n/a"."""
    lines = ["| signal | examples | share |", "|---|---|---|"]
    lines += [f"| length: {b.replace('_', ' ')} | {e['length_buckets'].get(b, 0)} | "
              f"{e['length_buckets'].get(b, 0) / e['n']:.1%} |" for b in LENGTH_BUCKETS]
    for key, label in (("repeats_trigram", "repeats a trigram"),
                       ("degenerate_repetition", "degenerate repetition (one trigram 3+ times)"),
                       ("template_leak", "template leakage (prompt markers in the output)"),
                       ("run_on", "run-on (never stopped, or leaked the template)"),
                       ("hallucination_flag", "numbers or names absent from the article")):
        cells = f"{e[key]} | {e[key + '_share']:.1%}" if key in e else "n/a | n/a"
        lines.append(f"| {label} | {cells} |")
    return lines + [
        "",
        f"Mean length ratio (prediction / reference words): {e['mean_length_ratio']:.2f} "
        f"(median {e['median_length_ratio']:.2f}). Mean share of novel bigrams (not in the article; "
        f"abstractiveness): {e['mean_novel_bigram_share']:.1%}.",
        "",
    ]


def _stopped_share(metrics: dict) -> str:
    count = stopped_by_itself_count(metrics)
    return "n/a" if count is None else f"{count / max(metrics['generated_rows'], 1):.1%}"


def write_report(path: Path, metrics: dict, rows: list[dict], generations: list[dict], scores: list[dict],
                 analyses: list[dict], other: dict | None = None, worst_k: int = 5) -> None:
    m = metrics
    kind = "zero-shot base model (no adapter)" if m["zero_shot"] else f"fine-tuned adapter `{m['adapter']}`"
    lines = [
        f"# Evaluation: {kind}",
        "",
        f"Model `{m['model']}`, split `{m['split']}`: loss on {m['loss_rows']} rows, generation on "
        f"{m['generated_rows']} rows.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation loss (mean per summary + EOS token, {m['loss_rows']} `{m['split']}` rows) | "
        f"{m['val_loss']:.4f} |",
        f"| perplexity (of that loss) | {m['val_perplexity']:.2f} |",
    ]
    lines += [f"| {ROUGE_LONG_NAMES[k]} F1, mean [95% bootstrap CI] | {rouge_cell(m['rouge'][k])} |"
              for k in ROUGE_KEYS]
    lines += [
        "",
        "ROUGE with `rouge-score`, Porter stemming on. ROUGE-Lsum splits prediction and reference into one "
        "sentence per line and takes the union LCS; it is the figure CNN/DailyMail papers report as "
        "\"ROUGE-L\". Plain ROUGE-L here is the LCS over the whole text as one sequence.",
        "",
    ]
    if other is not None:
        base, tuned = (other, m) if not m["zero_shot"] else (m, other)
        lines += ["## Gain from fine-tuning", "",
                  "| metric | zero-shot | fine-tuned | gain |", "|---|---|---|---|",
                  f"| validation loss | {base['val_loss']:.4f} | {tuned['val_loss']:.4f} | "
                  f"{tuned['val_loss'] - base['val_loss']:+.4f} |"]
        for k in ROUGE_KEYS:
            b, t = base["rouge"][k]["mean"], tuned["rouge"][k]["mean"]
            lines.append(f"| {ROUGE_LONG_NAMES[k]} | {b:.2f} | {t:.2f} | {t - b:+.2f} |")
        lines.append(f"| stopped by itself (EOS or stop string after some text) | {_stopped_share(base)} | "
                     f"{_stopped_share(tuned)} | |")
        lines.append("")

    g, stops = m["generation"], m["stop_reasons"]
    n = max(m["generated_rows"], 1)
    stopped = stopped_by_itself_count(m)
    lines += [
        "## Stopping",
        "",
        f"- ended with EOS: {stops['eos']} ({stops['eos'] / n:.1%})",
        f"- ended at a stop string {g['stop_strings']}: {stops['stop_string']} ({stops['stop_string'] / n:.1%})",
        "- of those, stopped by itself after some text: "
        + (f"{stopped} ({stopped / n:.1%}); empty: {stops['eos'] + stops['stop_string'] - stopped}"
           if stopped is not None else "n/a"),
        f"- **hit max_new_tokens={g['max_new_tokens']} without stopping: {stops['max_new_tokens']} "
        f"({stops['max_new_tokens'] / n:.1%})**",
        "",
        f"Generation: {'sampling' if g['do_sample'] else 'greedy' if g['num_beams'] == 1 else 'beam search'}"
        f" (beams {g['num_beams']}), {g['generated_tokens']} tokens in {g['seconds']:.1f} s = "
        f"{g['generated_tokens_per_s']:.1f} generated tokens/s, {g['articles_per_s']:.2f} articles/s.",
        "",
    ]

    e = m["errors"]
    if e.get("n"):
        lines += ["## Error analysis", "", *error_summary_lines(e),
                  f"## The {min(worst_k, len(rows))} worst examples by ROUGE-Lsum", ""]
        for i in worst_examples(analyses, [s["rougeLsum"] for s in scores], k=worst_k):
            a = analyses[i]
            flags = [k for k in ("empty", "repeats_trigram", "degenerate_repetition", "template_leak", "run_on",
                                 "hallucination_flag") if a[k]]
            lines += [
                f"### {rows[i]['id']}: ROUGE-Lsum {scores[i]['rougeLsum']:.1f}, stop: {generations[i]['stop_reason']}"
                + (f", flags: {', '.join(flags)}" if flags else ""),
                "",
                f"- **Article:** {excerpt(rows[i]['article'])}",
                f"- **Reference:** {rows[i]['summary']}",
                f"- **Prediction:** {generations[i]['text'] or '(empty)'}",
            ]
            if a["unsupported_numbers"] or a["unsupported_names"]:
                lines.append(f"- **Not in the article:** {', '.join(a['unsupported_numbers'] + a['unsupported_names'])}")
            lines.append("")
    write_atomic(path, "\n".join(lines) + "\n")
