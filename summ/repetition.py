"""No repeated n-grams and a repetition penalty over the generated summary only.

transformers' `no_repeat_ngram_size` and `repetition_penalty` look at the whole sequence. For a
decoder-only model that is the prompt and the summary, so every trigram of the article is banned
from the summary (the model may not copy three words of it in a row) and every article token is
penalized: what a summarizer should do most, quote names and phrases from its article, is what
they forbid. Here both rules see only the tokens generated so far, as an encoder-decoder's decoder
does (BART's and PEGASUS's published "no repeated trigrams" is this rule).

The same two functions run inside the fast engine's decode step (static shapes, a length tensor,
so one CUDA graph serves every step) and, through `SummaryOnlyRepetition`, in transformers'
`generate` for beam search and sampling.

With `token_classes` (eval.no_repeat_ignore_case) the ban compares tokens by their text, lowercased
and without surrounding whitespace: "The council" at the start of a line repeats " the council"
although its token ids differ.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import LogitsProcessor


@lru_cache(maxsize=4)  # decoding the whole vocabulary takes up to a second: once per tokenizer
def token_classes(tokenizer, vocab_size: int) -> tuple[int, ...]:
    """Each token id's class for a case-insensitive ban: the smallest id whose text, lowercased and
    stripped of surrounding whitespace, is the same ("The", " the" and " THE" share one). Special
    tokens, whitespace, partial UTF-8 bytes and ids past the tokenizer are each their own class."""
    known = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    special = set(tokenizer.all_special_ids)
    classes, first = list(range(vocab_size)), {}
    for i, text in enumerate(texts):
        key = text.strip().lower()
        if key and i not in special and "\ufffd" not in key:
            classes[i] = first.setdefault(key, i)
    return tuple(classes)


def ban_repeated_ngrams(scores: torch.Tensor, generated: torch.Tensor, length, n: int,
                        classes: torch.Tensor | None = None) -> torch.Tensor:
    """`scores` (rows, vocab) with -inf on every token that would complete an n-gram already in the
    row's first `length` generated tokens (`generated`: (rows, >= length) ids; later columns are
    ignored). The rule of transformers' NoRepeatNGramLogitsProcessor, applied to those tokens; with
    `classes` (vocab,) (`token_classes`), to their classes, banning every token of the class."""
    width = generated.shape[1]
    if width < n:
        return scores
    vocab = scores.shape[-1]
    if classes is not None:
        generated = classes[generated]
    # The last n-1 tokens written; before there are n-1 of them no window below can match.
    prefix_at = (length - (n - 1) + torch.arange(n - 1, device=generated.device)).clamp(min=0)
    windows = generated.unfold(1, n, 1)  # (rows, width - n + 1, n)
    matches = (windows[..., :-1] == generated[:, prefix_at].unsqueeze(1)).all(-1)
    # A window counts once its last token is written; the one ending at the next position is not.
    matches &= torch.arange(width - n + 1, device=generated.device) + n <= length
    # Windows that do not match scatter into a spare column, where they cannot unban another's token.
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    banned = banned[:, :vocab] if classes is None else banned[:, classes]  # a class id is its first token's id
    return scores.masked_fill(banned, float("-inf"))


def penalize_repeated_tokens(scores: torch.Tensor, generated: torch.Tensor, length, penalty: float) -> torch.Tensor:
    """`scores` with every token of the row's first `length` generated tokens penalized as
    transformers' RepetitionPenaltyLogitsProcessor does (a positive score divided by `penalty`, a
    negative one multiplied by it)."""
    vocab = scores.shape[-1]
    written = torch.arange(generated.shape[1], device=generated.device) < length
    seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    seen.scatter_(1, torch.where(written, generated.clamp(max=vocab), vocab), True)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalized, scores)


def apply_repetition_rules(scores: torch.Tensor, generated: torch.Tensor, length, no_repeat_ngram_size: int,
                           repetition_penalty: float, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Both rules, as configured (0 and 1.0 switch one off; `classes`: the ban ignores case)."""
    if repetition_penalty != 1.0:
        scores = penalize_repeated_tokens(scores, generated, length, repetition_penalty)
    if no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, generated, length, no_repeat_ngram_size, classes)
    return scores


class SummaryOnlyRepetition(LogitsProcessor):
    """The rules for `model.generate` on left-padded batches whose prompts take the first
    `prompt_width` columns of `input_ids` (every row and beam: padding is on the left)."""

    def __init__(self, prompt_width: int, no_repeat_ngram_size: int, repetition_penalty: float,
                 classes: torch.Tensor | None = None):
        self.prompt_width, self.classes = prompt_width, classes
        self.no_repeat_ngram_size, self.repetition_penalty = no_repeat_ngram_size, repetition_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width:]
        return apply_repetition_rules(scores, generated, generated.shape[1], self.no_repeat_ngram_size,
                                      self.repetition_penalty, self.classes)
