"""Evaluation of a trained adapter (or the zero-shot base model): validation loss and perplexity,
summaries (summ.summaries), ROUGE with bootstrap intervals, error analysis, and the files a user
reads afterwards.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch

from summ.config import EvalConfig, RunConfig
from summ.data import Encoder, encode_rows, load_rows
from summ.errors import aggregate_errors, analyze_example, stopped_by_itself
from summ.files import write_atomic, write_json
from summ.loss import evaluate_loss
from summ.model_card import refresh_model_card
from summ.model import load_for_inference, load_tokenizer
from summ.precision import mixed_precision_mode, resolve_compute_dtype
from summ.run_lock import hold_run_output
from summ.rouge import ROUGE_KEYS, aggregate, score_pairs
from summ.summaries import Generation, gather_in_order, generate_summaries

log = logging.getLogger(__name__)

EVAL_DIR, ZERO_SHOT_DIR = "eval", "zero_shot"


def template_markers(template: str, stop_strings) -> tuple[str, ...]:
    """The prompt's own markers ("### Article:", "Summary:"): seeing one in a prediction means the
    model ran on past its summary into the prompt format."""
    markers = {m.group(1).strip() for line in template.splitlines() if (m := re.match(r"^\s*(.{1,30}?:)", line))}
    return tuple(sorted(markers | {s for s in stop_strings if s.strip()}))


def decoding_settings(ev: EvalConfig) -> dict:
    return {"max_new_tokens": ev.max_new_tokens, "min_new_tokens": ev.min_new_tokens, "num_beams": ev.num_beams,
            "length_penalty": ev.length_penalty, "do_sample": ev.do_sample,
            "no_repeat_ngram_size": ev.no_repeat_ngram_size, "repetition_penalty": ev.repetition_penalty,
            "repetition_scope": ev.repetition_scope, "no_repeat_ignore_case": ev.no_repeat_ignore_case,
            "stop_strings": list(ev.stop_strings)}


def write_evaluation(out_dir: Path, run_dir: Path, metrics: dict, gen_rows: list[dict], generations: list,
                     scores: list[dict], analyses: list[dict]) -> None:
    """predictions.jsonl, errors.jsonl, eval_metrics.json and eval_report.md (beside the run's other
    evaluation, zero-shot or trained, when there is one)."""
    from summ.eval_report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "predictions.jsonl", "".join(
        json.dumps({"id": r["id"], "reference": r["summary"], "prediction": g.text, "stop_reason": g.stop_reason,
                    "new_tokens": g.new_tokens, **{k: sc[k] for k in ROUGE_KEYS}}, ensure_ascii=False) + "\n"
        for r, g, sc in zip(gen_rows, generations, scores)))
    write_atomic(out_dir / "errors.jsonl", "".join(
        json.dumps({"id": r["id"], **a}, ensure_ascii=False) + "\n" for r, a in zip(gen_rows, analyses)))
    write_json(out_dir / "eval_metrics.json", metrics)
    baseline_dir = run_dir / (EVAL_DIR if metrics["zero_shot"] else ZERO_SHOT_DIR)
    baseline = json.loads((baseline_dir / "eval_metrics.json").read_text()) \
        if (baseline_dir / "eval_metrics.json").is_file() else None
    write_report(out_dir / "eval_report.md", metrics, gen_rows, [asdict(g) for g in generations], scores,
                 analyses, other=baseline)


def evaluate_run(cfg: RunConfig, run_dir: str | Path, *, zero_shot: bool = False, name: str | None = None) -> dict:
    """Score the run's adapter (or, with `zero_shot`, the base model) on data.eval_split and write
    predictions.jsonl, errors.jsonl, eval_metrics.json and eval_report.md into run_dir/eval (or
    run_dir/zero_shot, or run_dir/`name`: a second decoding kept beside the first)."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    out_dir = run_dir / (name or (ZERO_SHOT_DIR if zero_shot else EVAL_DIR))
    adapter_dir = None if zero_shot else run_dir / "adapter"
    ev = cfg.eval
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(cfg.train.mixed_precision))

    # Data first: a bad split fails before a model loads.
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    rows, row_stats = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    examples = encode_rows(encoder, rows, cfg.data.eval_split)
    gen_rows = rows[:ev.generate_rows] if ev.generate_rows else rows

    if accelerator.is_main_process:
        hold_run_output(run_dir, out_dir.name, "evaluation")
    dtype = resolve_compute_dtype(cfg.quant.compute_dtype, accelerator.device)
    if torch.cuda.is_available():
        # Right after training, the allocator still holds the training step's blocks (as large as
        # the memory probe allowed); return them so generation batches are sized from what is free.
        gc.collect()
        torch.cuda.empty_cache()
    model = load_for_inference(cfg, accelerator.device, dtype, adapter_dir, merge=False)
    # The loss of the model as training validated it: the adapter beside the weights, under the same
    # autocast. Folding it in first rounds the merged weights (in bf16), and the figure drifts from
    # training's last validation in the 4th decimal.
    with accelerator.autocast():
        val_loss = evaluate_loss(model, examples, ev.batch_size, tokenizer.pad_token_id, accelerator)
    if ev.merge_adapter and adapter_dir is not None and not getattr(model, "is_loaded_in_4bit", False):
        model = model.merge_and_unload()  # faster generation; the saved adapter is untouched
    # Each rank summarizes every num_processes-th row; all ranks get every summary, in input order.
    mine = range(accelerator.process_index, len(gen_rows), accelerator.num_processes)
    generations, speed = generate_summaries(model, tokenizer, encoder, [gen_rows[i]["article"] for i in mine], ev,
                                            accelerator.device)
    generations = gather_in_order(accelerator, list(mine), generations, len(gen_rows))

    references = [r["summary"] for r in gen_rows]
    scores = score_pairs([g.text for g in generations], references)
    markers = template_markers(encoder.template.text, ev.stop_strings)
    analyses = [analyze_example(r["article"], r["summary"], g.text, stop_reason=g.stop_reason,
                                template_markers=markers) for r, g in zip(gen_rows, generations)]
    stop_counts = {k: sum(g.stop_reason == k for g in generations) for k in ("eos", "stop_string", "max_new_tokens")}
    stopped = sum(stopped_by_itself(g.stop_reason, g.text) for g in generations)
    metrics = {
        "model": cfg.model.name_or_path, "adapter": str(adapter_dir) if adapter_dir else None,
        "zero_shot": zero_shot, "split": cfg.data.eval_split, "loss_rows": len(examples),
        "generated_rows": len(gen_rows), "rows_skipped": row_stats.skipped,
        "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)),
        "rouge": aggregate(scores, n_resamples=ev.bootstrap_resamples, seed=cfg.train.seed),
        "stop_reasons": stop_counts,
        # EOS or a stop string after some text (summ.errors.stopped_by_itself); empty summaries do not count.
        "stopped_by_itself": stopped, "stopped_by_itself_share": stopped / max(len(generations), 1),
        "generation": {"adapter_merged": adapter_dir is not None and not hasattr(model, "peft_config"),
                       "base_in_4bit": cfg.quant.enabled and not ev.dequantize_for_generation,
                       **decoding_settings(ev), **speed},
        "errors": aggregate_errors(analyses),
    }

    if accelerator.is_main_process:
        write_evaluation(out_dir, run_dir, metrics, gen_rows, generations, scores, analyses)
        if adapter_dir is not None and name is None:  # the adapter's model card shows its ROUGE from now on
            refresh_model_card(run_dir)
    log.info("eval (%s): val loss %.4f on %d %s rows, ROUGE-1/2/L/Lsum %s, %d of %d stopped by themselves "
             "after some text", out_dir.name, val_loss, len(examples), cfg.data.eval_split,
             "/".join(f"{metrics['rouge'][k]['mean']:.2f}" for k in ROUGE_KEYS), stopped, len(generations))
    return metrics
