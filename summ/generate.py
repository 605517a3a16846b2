"""Batched greedy generation at the speed of the hardware.

`transformers`' `generate` spends most of a small model's decode step in Python: a dozen
kernel launches per layer, logits processors, a text-level stop-string check and a host sync
every token. Here one decode step (forward + argmax + EOS bookkeeping) is captured once as a
CUDA graph by `torch.compile(mode="reduce-overhead")` over a static KV cache, the host looks
at the tokens only every few steps, and stop strings are found from a per-tokenizer table of
the tokens that can complete one. The result is the same greedy text as `model.generate`:
rows are independent, and text is cut at EOS and at the first stop string exactly as before.
No repeated n-grams and the repetition penalty (summ.repetition: over the summary only) run inside
the captured step.

Beam search and sampling stay on `model.generate` (see summ.evaluation).
"""

from __future__ import annotations

import inspect
import logging

import torch

from summ.repetition import apply_repetition_rules

log = logging.getLogger(__name__)

# Tokens are copied to the host every this many steps to look for stop strings and finished
# batches: a row that reached a stop string runs at most this many steps more (its extra tokens
# are cut from the text), instead of the host waiting on the GPU every step.
CHECK_EVERY = 8
# Static caches are sized in multiples of this, so batches of similar prompt length share one
# compiled graph.
CACHE_BUCKET = 64


def stop_candidates(tokenizer, stop_strings, vocab_size: int) -> torch.Tensor:
    """A (vocab_size,) bool table: True where the token's text holds the last character of a stop
    string, the only tokens that can complete one. Ids the tokenizer does not know (a model's
    embedding is often padded past its vocabulary) count as candidates. Built once per tokenizer,
    stop strings and size."""
    key = ("summ_stop_candidates", tuple(stop_strings), vocab_size)
    cache = tokenizer.__dict__.setdefault("_summ_cache", {})
    if key not in cache:
        last_chars = {s[-1] for s in stop_strings if s}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        # A non-ASCII character may be split over byte-level tokens that decode to U+FFFD alone.
        partial = any(ord(c) > 127 for c in last_chars)
        known = [any(c in t for c in last_chars) or (partial and "\ufffd" in t) for t in texts]
        cache[key] = torch.tensor((known + [True] * vocab_size)[:vocab_size], dtype=torch.bool)
    return cache[key]


def longest_first(prompts: list[list[int]]) -> list[int]:
    """Prompt indices, longest first: similar lengths share a batch and pad little."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def left_padded(prompts: list[list[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left to the longest; the mask runs on
    with ones to `length` (positions not yet written are hidden by causality, not by the mask)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.ones((len(prompts), length or width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, :width - len(p)] = 0
    return input_ids, mask


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _cache_keyword(model) -> str:
    """transformers renamed the forward's cache argument (`past_key_values` -> `cache`) within 5.x."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class GreedyDecoder:
    """Greedy decoding of left-padded batches with a KV cache.

    With `compile` (CUDA; "cudagraphs": dynamo traces the step and CUDA graphs replay it, seconds to
    set up; "inductor": also fuses kernels, a minute or more to compile) the decode step runs as a
    CUDA graph over a static cache sized once per
    call; every batch then has the same shape (the last one is filled up with copies of a row),
    so the graph is captured once. Without it the same loop runs eagerly on a dynamic cache, as
    `model.generate` does on a CPU; `static` keeps the static cache and shapes without compiling
    (what tests check on a CPU).
    """

    def __init__(self, model, tokenizer, stop_strings, device: torch.device, compile: str | None = None,
                 static: bool = False, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                 ngram_classes: torch.Tensor | None = None):
        from transformers import DynamicCache, StaticCache

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.candidates = stop_candidates(tokenizer, self.stop_strings, self.vocab_size) if self.stop_strings else None
        self.eos = torch.tensor(eos_token_ids(model, tokenizer), device=device)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.eos[0])
        self.cache_keyword = _cache_keyword(model)
        self.no_repeat_ngram_size, self.repetition_penalty = no_repeat_ngram_size, repetition_penalty
        self.ngram_classes = None if ngram_classes is None else ngram_classes.to(device)
        # Added to the logits: nothing, or EOS ruled out (before min_new_tokens).
        self.no_bias = torch.zeros(self.vocab_size, device=device)
        self.no_eos = self.no_bias.clone().index_fill_(0, self.eos, float("-inf"))
        self.static = static or compile is not None
        self._static_cache_class, self._dynamic_cache_class = StaticCache, DynamicCache
        self._cache, self._cache_shape = None, None
        if compile == "inductor":
            self._step = torch.compile(self._decode, mode="reduce-overhead", dynamic=False)
        elif compile == "cudagraphs":
            self._step = torch.compile(self._decode, backend="cudagraphs", dynamic=False)
        else:
            self._step = self._decode

    def _forward(self, input_ids, position_ids, attention_mask, cache):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache}).logits[:, -1]

    def _decode(self, input_ids, position_ids, attention_mask, cache, logit_bias, generated, length):
        # logit_bias is fp32: the rules see fp32 scores, as in `generate`.
        scores = self._forward(input_ids, position_ids, attention_mask, cache) + logit_bias
        scores = apply_repetition_rules(scores, generated, length, self.no_repeat_ngram_size, self.repetition_penalty,
                                        self.ngram_classes)
        return scores.argmax(-1)

    def _new_cache(self, batch: int, length: int):
        config = self.model.config.get_text_config(decoder=True)
        if not self.static:
            return self._dynamic_cache_class(config=config)
        if self._cache_shape != (batch, length):
            self._cache, self._cache_shape = self._static_cache_class(config=config, max_cache_len=length), (batch, length)
        else:
            self._cache.reset()
        return self._cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                 min_new_tokens: int = 0) -> list[list[int]]:
        """New token ids for each prompt, in input order; a row that ended is padded after its EOS
        (or stop string), as `model.generate` pads it. Before `min_new_tokens` EOS cannot be chosen,
        as with `generate`'s argument of that name."""
        order = longest_first(prompts)
        cache_length = -(-(len(prompts[order[0]]) + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET if prompts else 0
        results: list[list[int] | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            # A compiled graph has one batch size: fill the last batch up with copies of its first row.
            fill = batch_size - len(rows) if self.static else 0
            batch = [prompts[i] for i in rows] + [prompts[rows[0]]] * fill
            for i, tokens in zip(rows, self._generate_batch(batch, max_new_tokens, cache_length, min_new_tokens)):
                results[i] = tokens
        return results

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, cache_length: int,
                        min_new_tokens: int) -> list[list[int]]:
        device, batch = self.device, len(prompts)
        width = max(len(p) for p in prompts)
        total = cache_length if self.static else width + max_new_tokens
        input_ids, mask = (t.to(device) for t in left_padded(prompts, self.pad, total))
        # As `generate` numbers left-padded rows: from 0 at the first real token (padding at 1).
        positions = (mask[:, :width].cumsum(-1) - 1).masked_fill(mask[:, :width] == 0, 1)
        cache = self._new_cache(batch, total)

        no_bias, no_eos = self.no_bias, self.no_eos
        logits = self._forward(input_ids, positions, mask if self.static else mask[:, :width], cache)
        token = (logits + (no_eos if min_new_tokens > 0 else no_bias)).argmax(-1)
        position = positions[:, -1:] + 1
        out = torch.full((batch, max_new_tokens), self.pad, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        host_done = [False] * batch
        host_tokens: list[list[int]] = [[] for _ in range(batch)]
        # Tokens written before each step, as tensors: the captured step takes its length as an input.
        lengths = torch.arange(1, max_new_tokens + 1, device=device)
        for step in range(max_new_tokens):
            token = torch.where(done, self.pad, token)
            out[:, step] = token
            done |= torch.isin(token, self.eos)
            last = step + 1 == max_new_tokens
            if (step + 1) % CHECK_EVERY == 0 or last:
                if self._check_finished(out, step, done, host_done, host_tokens) or last:
                    break
            length = width + step + 1
            step_mask = mask if self.static else mask[:, :length]
            # The graph's output is overwritten by its next replay: clone it before that.
            bias = no_eos if step + 1 < min_new_tokens else no_bias
            token = self._step(token[:, None], position, step_mask, cache, bias, out, lengths[step]).clone()
            position = position + 1
        return out.tolist()

    def _check_finished(self, out, step, done, host_done, host_tokens) -> bool:
        """Copy the tokens since the last check to the host, mark rows whose text now holds a stop
        string as done, and say whether every row is done."""
        first = len(host_tokens[0])
        chunk = out[:, first:step + 1].cpu()
        done_now = done.cpu().tolist()
        for r in range(len(host_tokens)):
            host_tokens[r].extend(chunk[r].tolist())
            if done_now[r] or host_done[r]:
                host_done[r] = True
                continue
            if self.candidates is not None and bool(self.candidates[chunk[r]].any()):
                text = self.tokenizer.decode(host_tokens[r], skip_special_tokens=True)
                if any(s in text for s in self.stop_strings):
                    host_done[r] = True
                    done[r] = True
        return all(host_done)
