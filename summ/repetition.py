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
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def ban_repeated_ngrams(scores: torch.Tensor, generated: torch.Tensor, length, n: int) -> torch.Tensor:
    """`scores` (rows, vocab) with -inf on every token that would complete an n-gram already in the
    row's first `length` generated tokens (`generated`: (rows, >= length) ids; later columns are
    ignored). The rule of transformers' NoRepeatNGramLogitsProcessor, applied to those tokens."""
    width = generated.shape[1]
    if width < n:
        return scores
    vocab = scores.shape[-1]
    # The last n-1 tokens written; before there are n-1 of them no window below can match.
    prefix_at = (length - (n - 1) + torch.arange(n - 1, device=generated.device)).clamp(min=0)
    windows = generated.unfold(1, n, 1)  # (rows, width - n + 1, n)
    matches = (windows[..., :-1] == generated[:, prefix_at].unsqueeze(1)).all(-1)
    # A window counts once its last token is written; the one ending at the next position is not.
    matches &= torch.arange(width - n + 1, device=generated.device) + n <= length
    # Windows that do not match scatter into a spare column, where they cannot unban another's token.
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


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
                           repetition_penalty: float) -> torch.Tensor:
    """Both rules, as configured (0 and 1.0 switch one off)."""
    if repetition_penalty != 1.0:
        scores = penalize_repeated_tokens(scores, generated, length, repetition_penalty)
    if no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, generated, length, no_repeat_ngram_size)
    return scores


class SummaryOnlyRepetition(LogitsProcessor):
    """The rules for `model.generate` on left-padded batches whose prompts take the first
    `prompt_width` columns of `input_ids` (every row and beam: padding is on the left)."""

    def __init__(self, prompt_width: int, no_repeat_ngram_size: int, repetition_penalty: float):
        self.prompt_width = prompt_width
        self.no_repeat_ngram_size, self.repetition_penalty = no_repeat_ngram_size, repetition_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width:]
        return apply_repetition_rules(scores, generated, generated.shape[1], self.no_repeat_ngram_size,
                                      self.repetition_penalty)
