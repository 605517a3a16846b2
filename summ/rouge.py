"""ROUGE F1 per example, a rule-based sentence splitter for ROUGE-Lsum, and bootstrap confidence intervals.

Papers report CNN/DailyMail "ROUGE-L" as the summary-level LCS (rougeLsum), which needs one sentence
per line. nltk's punkt is the usual splitter, but it needs a separate data download at run time;
`split_sentences` is a rule-based splitter tuned for news text, so scoring works offline with nothing
beyond rouge-score installed (its cases are tested in tests/test_rouge.py).

rouge-score's tokenizer keeps ASCII letters and digits only: Arabic, Hebrew, Chinese, Japanese or
Cyrillic text has no tokens and a perfect summary scores 0. Text that is mostly outside ASCII is scored
with a Unicode tokenizer instead (words of any script, one token per character of a script written
without spaces, emoji; no stemming); English keeps the tokenizer and stemmer of published figures.
"""

from __future__ import annotations

import logging
import re
import unicodedata

import numpy as np

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The three figures summarization papers report (their "ROUGE-L" on CNN/DailyMail is rougeLsum).
PAPER_KEYS = ("rouge1", "rouge2", "rougeLsum")
# How each key is written in tables and plots: the one place for these names.
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# A table that shows both ROUGE-L variants to a reader who may not know them apart says which is which.
ROUGE_LONG_NAMES = {**ROUGE_NAMES, "rougeL": "ROUGE-L (sentence)", "rougeLsum": "ROUGE-Lsum (summary-level)"}

# ----------------------------------------------------------------------------- sentence splitting

# Titles sit in front of a name and "e.g."/"i.e."/"vs." introduce what follows, so a period after
# them never ends a sentence, whatever comes next.
_NEVER_FINAL = {"mr", "mrs", "ms", "dr", "prof", "sen", "gov", "gen", "rep", "rev", "capt", "col", "lt",
                "sgt", "cmdr", "adm", "supt", "insp", "det", "vs", "e.g", "i.e", "cf", "viz"}
# These usually continue the sentence ("Apple Inc. shares", "Jan. 5") but can also end one
# ("... and Google Inc. The deal", "on Main St. The house"), so they only end a sentence before a
# typical sentence opener.
_ABBREVIATIONS = {"inc", "ltd", "co", "corp", "plc", "jr", "sr", "st", "etc", "approx", "dept", "fig",
                  "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_OPENERS = {"the", "a", "an", "he", "she", "it", "they", "we", "i", "you", "his", "her", "its", "their",
            "our", "this", "that", "these", "those", "there", "but", "and", "in", "on", "at", "for",
            "if", "when", "while", "after", "before", "however", "as", "so", "police", "officials"}
# Candidate ends: the word carrying the terminal punctuation, the punctuation, any closing
# quotes/brackets, whitespace, then (not consumed) the next word. Only whitespace is ever cut, so
# "3.5", "£1.2m", "v2.0" and the inner dots of "U.S." are never candidates. Anchoring the match at a
# word start keeps the scan linear on long unbroken tokens (URLs, tables).
_CANDIDATE = re.compile(r"(?<!\S)(\S*?)(\.\.\.|…|[.?!]+)([\"'”’)\]]*)\s+(?=(\S+))")
_DOTTED_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "U.S", "e.g", "a.m" (final dot excluded)
_LEADING_PUNCT = "\"'“‘([{"


def _is_boundary(punct: str, word_before: str, next_word: str) -> bool:
    first = next_word[0]
    # Lowercase after a period means the sentence goes on ("e.g. the", "etc. and", "Why? he asked").
    if not (first.isupper() or first.isdigit() or first in _LEADING_PUNCT):
        return False
    if punct != ".":
        return True  # "?", "!", "?!", and an ellipsis before a capital
    word = word_before.lstrip(_LEADING_PUNCT)
    key = word.lower()
    opener = next_word.lstrip(_LEADING_PUNCT).rstrip(",;:").lower() in _OPENERS
    if key in _NEVER_FINAL:
        return False
    if word == "No" and first.isdigit():  # "No. 10 Downing Street"; "said no. Then" still splits
        return False
    if len(word) == 1 and word.isupper():  # initials: "J. K. Rowling", "George W. Bush"
        return False
    if key in _ABBREVIATIONS or _DOTTED_ACRONYM.fullmatch(word):
        return opener  # "the U.S. Army" stays whole; "in the U.S. The" splits
    return True


def split_sentences(text: str) -> list[str]:
    """Split English (news) text into stripped, non-empty sentences; newlines always split."""
    sentences = []
    for line in text.splitlines():
        start = 0
        for match in _CANDIDATE.finditer(line):
            word_before, punct, _, next_word = match.groups()
            if _is_boundary(punct, word_before, next_word):
                sentences.append(line[start:match.end(3)])
                start = match.end(3)
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()]


# ----------------------------------------------------------------------------- scoring



# Scripts written without spaces between words: each character is a token (as multilingual ROUGE
# scores Chinese and Japanese without a word segmenter). Thai, kana, CJK ideographs.
_CHARACTER_SCRIPTS = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNICODE_TOKEN = re.compile(rf"[{_CHARACTER_SCRIPTS}]|[^\W_{_CHARACTER_SCRIPTS}]+|[^\w\s]")


def unicode_tokens(text: str) -> list[str]:
    """Tokens of any script: runs of letters and digits, one token per character of a script without
    spaces, and each symbol such as an emoji; lowercased (casefold), no stemming."""
    return [t for t in _UNICODE_TOKEN.findall(text.casefold())
            if t[0].isalnum() or unicodedata.category(t[0]) == "So"]


class _UnicodeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return unicode_tokens(text)


def uses_unicode_tokens(text: str) -> bool:
    """Whether `text` is scored with the Unicode tokenizer: most of its letters are outside ASCII, or
    it has content that rouge-score's English tokenizer (ASCII letters and digits only) would drop
    entirely. English text keeps the tokenizer and Porter stemmer that published ROUGE figures use."""
    letters = [c for c in text if c.isalpha()]
    if 2 * sum(not c.isascii() for c in letters) > len(letters):
        return True
    return not re.search(r"[A-Za-z0-9]", text) and bool(unicode_tokens(text))


_SCORERS: dict = {}


def _scorer(unicode: bool = False):
    """(tokenizer, scorer) for English (rouge-score's own, Porter stemmer) or Unicode text."""
    if unicode not in _SCORERS:
        # Imported here: generation alone (benchmarks/bench_generate.py on a bare GPU image) needs no scorer.
        from rouge_score import rouge_scorer, tokenizers

        tokenizer = _UnicodeTokenizer() if unicode else tokenizers.DefaultTokenizer(use_stemmer=True)
        _SCORERS[unicode] = tokenizer, rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=tokenizer)
    return _SCORERS[unicode]


def score_pairs(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-example ROUGE F1 in percent; rougeLsum on one-sentence-per-line text, the others on raw text.

    rouge_score scores every key from the same (target, prediction) strings, so the text is rewritten
    one sentence per line once and scored once. That leaves rouge1/rouge2/rougeL exactly equal to
    raw-text scores: the tokenizer maps every non-alphanumeric character to a separator, and the
    splitter only cuts after punctuation and swaps whitespace for "\\n", so the token sequence is
    unchanged (tests/test_rouge.py checks this).
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: "
                         f"{len(predictions)} predictions vs {len(references)} references")
    results, empty = [], []
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        unicode = uses_unicode_tokens(reference) or uses_unicode_tokens(prediction)
        tokenizer, scorer = _scorer(unicode)
        if not tokenizer.tokenize(reference):
            empty.append(i)
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        results.append({key: 100.0 * scores[key].fmeasure for key in ROUGE_KEYS})
    if empty:
        log.warning("ROUGE: %d of %d references have no tokens to score (rows %s); they score 0 whatever the "
                    "prediction", len(empty), len(references), ", ".join(str(i + 1) for i in empty[:5]))
    return results


# ----------------------------------------------------------------------------- confidence intervals

# Bound the (resamples x examples) index matrix to ~32 MB however large the evaluation set is.
_MAX_DRAWS_PER_CHUNK = 4_000_000


def bootstrap_ci(values: list[float], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and a percentile-bootstrap interval over examples."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of values, got shape {data.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return mean, mean, mean  # every resample is identical; skip the float noise of re-averaging
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // data.size)
    means = np.concatenate([
        data[rng.integers(0, data.size, size=(min(chunk, n_resamples - done), data.size))].mean(axis=1)
        for done in range(0, n_resamples, chunk)
    ])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return mean, float(low), float(high)


def aggregate(per_example: list[dict[str, float]], n_resamples: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Corpus ROUGE: for each key, the mean over examples and its 95% bootstrap interval."""
    if not per_example:
        raise ValueError("aggregate needs at least one scored example")
    result = {}
    for key in ROUGE_KEYS:
        mean, low, high = bootstrap_ci([row[key] for row in per_example], n_resamples=n_resamples, seed=seed)
        result[key] = {"mean": mean, "low": low, "high": high}
    return result


def rouge_cell(r: dict) -> str:
    """One key of `aggregate` as a table cell: mean [low, high]."""
    return f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
