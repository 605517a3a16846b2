"""Summaries from a model: articles in, text and why it ended out. Greedy decoding runs on
summ.generate's batched decoder, beams and sampling on transformers' `generate`; both give the same
greedy text. Evaluation, `predict` and training's validation (eval.validation_rouge_rows) use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from summ.config import EvalConfig
from summ.data import Encoder
from summ.generate import GreedyDecoder, left_padded, longest_first
from summ.repetition import SummaryOnlyRepetition, token_classes


@dataclass
class Generation:
    text: str
    # "eos": the model ended the summary itself; "stop_string": it reached a configured stop
    # (the end of the line, the next template marker); "max_new_tokens": it never stopped.
    stop_reason: str
    new_tokens: int


def repetition_rules_on(ev: EvalConfig) -> bool:
    return ev.no_repeat_ngram_size > 0 or ev.repetition_penalty != 1.0


def ngram_classes(ev: EvalConfig, model, tokenizer) -> torch.Tensor | None:
    """The token classes of a case-insensitive ban (eval.no_repeat_ignore_case), or None."""
    if not (ev.no_repeat_ignore_case and ev.no_repeat_ngram_size > 0):
        return None
    return torch.tensor(token_classes(tokenizer, model.get_output_embeddings().weight.shape[0]))


def uses_fast_engine(ev: EvalConfig) -> bool:
    """Whether summ.generate's greedy decoder can run `ev`: greedy decoding, its repetition rules over
    the summary only."""
    sequence_rules = ev.repetition_scope == "sequence" and repetition_rules_on(ev)
    return ev.engine == "fast" and ev.num_beams == 1 and not ev.do_sample and not sequence_rules


# Fewer articles than this are summarized without compiling: 30-55 s of compiling would cost a
# `predict` of a few articles more than it saves.
COMPILE_MIN_ARTICLES = 200


def compiled(ev: EvalConfig, device: torch.device, articles: int) -> str | None:
    """How the fast engine captures its decode step for `articles` here (None: eagerly)."""
    if not uses_fast_engine(ev) or ev.compile == "none" or device.type != "cuda":
        return None
    return ev.compile if articles >= COMPILE_MIN_ARTICLES else None


def generation_batch_size(ev: EvalConfig, model, prompts: list[list[int]], device: torch.device) -> int:
    """eval.generate_batch_size, or as many rows as fit eval.generate_memory_gib (default: half the
    free GPU memory; 16 on a CPU)."""
    if ev.generate_batch_size is not None:
        return ev.generate_batch_size
    if device.type != "cuda":
        return 16
    budget = ev.generate_memory_gib * 2**30 if ev.generate_memory_gib else torch.cuda.mem_get_info(device)[0] / 2
    width = max((len(p) for p in prompts), default=1)
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return rows_that_fit(model.config.get_text_config(decoder=True), element, width, ev.max_new_tokens, budget)


def rows_that_fit(config, element_bytes: int, width: int, max_new_tokens: int, budget_bytes: float,
                  most: int = 64) -> int:
    """The most rows (a power of two, at most `most`) whose KV cache for `width + max_new_tokens`
    positions, prefill activations and logits fit `budget_bytes`."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_cache = 2 * config.num_hidden_layers * heads * head_dim * (width + max_new_tokens) * element_bytes
    # The widest prefill activation (the MLP's hidden layer) a few times over, and fp32 logits.
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    per_row = kv_cache + 4 * width * intermediate * element_bytes + 4 * config.vocab_size
    rows = most
    while rows > 1 and rows * per_row > budget_bytes:
        rows //= 2
    return rows


@torch.no_grad()
def generate_summaries(model, tokenizer, encoder: Encoder, articles: list[str], ev: EvalConfig,
                       device: torch.device, min_new_tokens: int = 0,
                       may_compile: bool = True) -> tuple[list[Generation], dict]:
    """Summaries for `articles` in input order, with throughput figures. Greedy decoding runs on
    summ.generate's decoder (eval.engine "fast"), everything else on transformers' `generate`;
    both give the same text. `min_new_tokens` (benchmarks) raises eval.min_new_tokens;
    `may_compile=False` keeps the decode step eager (a model still training)."""
    min_new_tokens = max(min_new_tokens, ev.min_new_tokens)
    prompts = [encoder.encode_prompt(a) for a in articles]
    batch_size = generation_batch_size(ev, model, prompts, device)
    model.eval()
    started = time.perf_counter()
    fast, capture = uses_fast_engine(ev), compiled(ev, device, len(articles)) if may_compile else None
    classes = ngram_classes(ev, model, tokenizer)
    if fast:
        decoder = GreedyDecoder(model, tokenizer, ev.stop_strings, device, compile=capture,
                                no_repeat_ngram_size=ev.no_repeat_ngram_size, repetition_penalty=ev.repetition_penalty,
                                ngram_classes=classes)
        new_ids = decoder.generate(prompts, ev.max_new_tokens, batch_size, min_new_tokens=min_new_tokens)
    else:
        new_ids = _generate_with_transformers(model, tokenizer, prompts, ev, device, batch_size, min_new_tokens,
                                              classes)
    results = [finish_generation(ids, tokenizer, ev.stop_strings) for ids in new_ids]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new_tokens = sum(g.new_tokens for g in results)
    speed = {"engine": "fast" if fast else "hf", "batch_size": batch_size, "compile": capture, "seconds": seconds,
             "generated_tokens": new_tokens, "generated_tokens_per_s": new_tokens / seconds,
             "articles_per_s": len(results) / seconds}
    return results, speed


def _generate_with_transformers(model, tokenizer, prompts: list[list[int]], ev: EvalConfig, device: torch.device,
                                batch_size: int, min_new_tokens: int,
                                classes: torch.Tensor | None = None) -> list[list[int]]:
    """New ids per prompt from `model.generate`, longest prompts first in left-padded batches."""
    order = longest_first(prompts)
    pad = tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams, do_sample=ev.do_sample,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=True, min_new_tokens=min_new_tokens,
                  length_penalty=ev.length_penalty)
    summary_rules = ev.repetition_scope == "summary" and repetition_rules_on(ev)
    if ev.repetition_scope == "sequence":
        kwargs.update(no_repeat_ngram_size=ev.no_repeat_ngram_size, repetition_penalty=ev.repetition_penalty)
    if ev.do_sample:
        kwargs.update(temperature=ev.temperature, top_p=ev.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # silence sampling defaults of generation_config
    if ev.stop_strings:
        kwargs.update(stop_strings=list(ev.stop_strings), tokenizer=tokenizer)
    new_ids: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        input_ids, attention_mask = left_padded([prompts[i] for i in rows], pad)
        width = input_ids.shape[1]
        if summary_rules:
            # Every row (and beam) of a left-padded batch starts its summary at column `width`.
            kwargs["logits_processor"] = LogitsProcessorList(
                [SummaryOnlyRepetition(width, ev.no_repeat_ngram_size, ev.repetition_penalty,
                                       None if classes is None else classes.to(device))])
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        for r, i in enumerate(rows):
            new_ids[i] = out[r, width:].tolist()
    return new_ids


def finish_generation(tokens: list[int], tokenizer, stop_strings) -> Generation:
    """Cut generated ids at EOS and the text at the first stop string, and say why it ended.

    `tokens` is one row of a batch: a row that ended before the others is padded up to the
    batch's length, so `new_tokens` counts only what the row generated itself (its EOS included,
    the padding after it not)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    reason, generated = "max_new_tokens", len(tokens)
    if eos in tokens:
        generated = tokens.index(eos) + 1
        tokens, reason = tokens[:generated - 1], "eos"
    elif pad is not None:
        # A row stopped by a stop string is padded after it; with a pad distinct from EOS that
        # padding is the only trace left of where the row ended.
        while generated and tokens[generated - 1] == pad:
            generated -= 1
        tokens = tokens[:generated]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [text.find(s) for s in stop_strings if s in text]
    if hits:
        text, reason = text[:min(hits)], "stop_string"
        # Generation stopped at the token completing the stop string; what follows it is padding
        # (Phi-2 pads with its EOS id, so the "EOS" found above may be padding too).
        generated = _tokens_through_stop(tokens, tokenizer, stop_strings)
    return Generation(text=text.strip(), stop_reason=reason, new_tokens=generated)


def _tokens_through_stop(tokens: list[int], tokenizer, stop_strings) -> int:
    """The length of the shortest prefix of `tokens` whose text holds a stop string."""
    def stops(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    low, high = 1, len(tokens)  # stops(high) holds: the caller found a stop string in all of them
    while low < high:
        mid = (low + high) // 2
        if stops(mid):
            high = mid
        else:
            low = mid + 1
    return high


def gather_in_order(accelerator, indices: list[int], items: list, total: int) -> list:
    """Every rank's `items` (item k belongs at `indices[k]`), on every rank, in input order."""
    pairs = list(zip(indices, items))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    ordered = [None] * total
    for i, item in pairs:
        ordered[i] = item
    return ordered
