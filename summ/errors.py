"""Per-example and aggregate error analysis of generated summaries.

ROUGE says how far a summary is from the reference, not why. These checks name the failure modes
we have actually seen from QLoRA summarizers: not stopping (running on into the prompt format,
e.g. "...### Vocabulary Exercises"), looping, empty or badly sized outputs, pure copying, and
numbers or names that the article never mentions. Every check is a cheap, deterministic
heuristic over the text, so records are flat, JSON-serialisable and comparable across runs;
none of them is a faithfulness model and all of them are meant to pick examples worth reading.

Stdlib only, on purpose: the analysis runs on saved generations without torch or a tokenizer.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

LENGTH_BUCKETS = ("empty", "too_short", "ok", "too_long")

# Flags counted by aggregate_errors; each gets a count and a `<flag>_share`.
_FLAGS = ("empty", "repeats_trigram", "degenerate_repetition", "template_leak", "run_on", "hallucination_flag")

# A trigram twice can be ordinary prose (a name said again: "the council approved ... the council
# approved"); three times in a summary of a sentence or three is the model going round in a loop
# ("UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP, ..."). The count is not scaled by length, so a
# 100-token ramble that says "the event was" three times is flagged too.
_LOOP_TRIGRAM_COUNT = 3

# Capitalised function words are capitalised for grammar, not because they name anything;
# without this list every "The" and "He" opening a clause would read as a hallucinated name.
# Only function words: acronyms such as "BBC" are names and must be checked like any other, and
# "May" and "Will" are left out because mid-sentence they are a month, a prime minister, a person.
_NAME_STOPWORDS = frozenset("""
    A An The This That These Those There Here Such
    I He She It We They You Me Him Her Us Them His Its Our Their Your My
    In On At Of For To By With From Into Onto Over Under About After Before During Since Until
    As Than Upon Within Without Between Among Against Across Through Per Via
    And But Or Nor So Yet If When While Where Whether Because Although Though Unless
    Who Whom Whose What Which Why How
    Is Are Was Were Be Been Being Has Have Had Do Does Did Would Shall Should Can Could Might Must
    Not No Yes All Some Any Each Every Both Either Neither Many Much More Most Other Another
    Mr Mrs Ms Miss Dr
""".split())

# Digits only: units and magnitudes after the number ("3.5m", "3.5 million", "40%") are not part
# of the match, so the check asks "did the article mention this quantity at all", which tolerates
# paraphrased units at the price of missing a wrong magnitude. A letter or dot directly before the
# digits ("G7", "A1", ".5") means it is not a free-standing number.
_NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?%?")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")
_POSSESSIVE = re.compile(r"['’]s$")


def _tokens(text: str) -> list[str]:
    # Punctuation is deleted, not turned into a space, so "1,200" stays one token and "don't"
    # does not leave a stray "t"; article and prediction go through the same function, so the
    # odd joined token ("state-run" -> "staterun") still matches itself.
    return re.sub(r"[^\w\s]", "", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _trigram_repeats(tokens: list[str]) -> tuple[float, int]:
    """The share of trigram occurrences that repeat an earlier one, and the count of the most frequent
    trigram (0.0 and 0 with fewer than 3 tokens)."""
    counts = Counter(_ngrams(tokens, 3))
    total = sum(counts.values())
    if not total:
        return 0.0, 0
    return (total - len(counts)) / total, max(counts.values())


def _novel_share(pred: list[str], article: list[str], n: int) -> float:
    # Counted over n-gram occurrences, not types: copying the same novel phrase twice is twice
    # as abstractive-looking as once, which is what a reader of the summary sees.
    grams = _ngrams(pred, n)
    if not grams:
        return 0.0
    source = set(_ngrams(article, n))
    return sum(g not in source for g in grams) / len(grams)


def _number_key(raw: str) -> str:
    return raw.replace(",", "").rstrip("%")


def _unsupported_numbers(prediction: str, article: str) -> list[str]:
    source = {_number_key(m) for m in _NUMBER.findall(article)}
    missing = {m for m in _NUMBER.findall(prediction) if _number_key(m) not in source}
    # Reported as written in the prediction, ordered by value so "9" comes before "12".
    return sorted(missing, key=lambda m: (float(_number_key(m)), m))


def _word_spans(text: str) -> list[tuple[str, bool, bool, bool]]:
    """(word, sentence_initial, breaks_before, breaks_after) for each word of `text`.

    A word is a whitespace token with surrounding punctuation and a possessive "'s" removed.
    Punctuation-only tokens ("###", "-") are not words, so they do not take the sentence-initial
    slot, but they do separate names. A sentence starts at the beginning of the text, at a line
    break, and after a token ending in . ! or ? (abbreviations such as "U.S." are mistaken for
    sentence ends; that only makes the next word exempt: the check misses a name, never invents one).
    """
    spans = []
    initial = True
    pending_break = False
    end = 0
    for match in re.finditer(r"\S+", text):
        raw = match.group()
        # CNN/DailyMail highlights are one per line, not always with a full stop.
        if "\n" in text[end:match.start()]:
            initial = pending_break = True
        end = match.end()
        word = _POSSESSIVE.sub("", re.sub(r"^\W+|\W+$", "", raw))
        if not word:
            pending_break = True
            if _SENTENCE_END.search(raw):
                initial = True
            continue
        lead = raw[0] != word[0]
        trail = not raw.endswith(word)
        spans.append((word, initial, pending_break or lead, trail))
        pending_break = False
        initial = bool(_SENTENCE_END.search(raw))
    return spans


def _candidate_names(prediction: str) -> list[str]:
    """Runs of adjacent capitalised words, e.g. "Theresa May", "BBC", "Paris".

    Sentence-initial words are capitalised by grammar, so one is only taken as (part of) a name
    when the same word also appears capitalised mid-sentence in the prediction. The blind spot
    is a name that only ever opens a sentence ("Paris has..."): missed, never invented.
    """
    spans = _word_spans(prediction)

    def capitalised(word: str) -> bool:
        return word[0].isupper() and word not in _NAME_STOPWORDS

    mid_sentence = {w for w, initial, _, _ in spans if not initial and capitalised(w)}
    names, current = [], []
    for word, initial, break_before, break_after in spans:
        if break_before and current:
            names.append(" ".join(current))
            current = []
        if capitalised(word) and (not initial or word in mid_sentence):
            current.append(word)
        elif current:
            names.append(" ".join(current))
            current = []
        if break_after and current:
            names.append(" ".join(current))
            current = []
    if current:
        names.append(" ".join(current))
    return names


def _mentions(article: str, phrase: str) -> bool:
    # Case-sensitive substring match anchored at word edges: a bare substring check would let
    # "Parisian" support "Paris" and "Mayor" support "May".
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", article) is not None


def _unsupported_names(prediction: str, article: str) -> list[str]:
    missing = set()
    for name in _candidate_names(prediction):
        # A longer run than the article uses ("Prime Minister Theresa May" against "the Prime
        # Minister" and "Theresa May") is still supported when each of its words is there.
        if not (_mentions(article, name) or all(_mentions(article, w) for w in name.split())):
            missing.add(name)
    return sorted(missing)


def analyze_example(article: str, reference: str, prediction: str, *, stop_reason: str,
                    template_markers: tuple[str, ...] = ("###", "Article:", "Summary:", "Instruction:"),
                    short_ratio: float = 0.5, long_ratio: float = 2.0) -> dict:
    """Flat, JSON-serialisable error record for one generated summary.

    `stop_reason` is how generation ended; "max_new_tokens" means the model never emitted EOS.
    Length buckets are relative to the reference: a missing reference gives ratio 0.0, so a
    non-empty prediction against it lands in "too_short" rather than raising mid-evaluation.
    Shares that need tokens (repeats, novelty, copying) are 0.0 when there is nothing to count.
    Repetition is over lowercased, punctuation-free tokens: `repeats_trigram` is any trigram twice,
    `degenerate_repetition` one trigram 3 or more times (a loop), and `max_trigram_count` the count
    of the most frequent trigram (0 with fewer than 3 tokens).
    """
    pred_words = len(prediction.split())
    ref_words = len(reference.split())
    ratio = pred_words / ref_words if ref_words else 0.0
    empty = not prediction.strip()
    if empty:
        bucket = "empty"
    elif ratio < short_ratio:
        bucket = "too_short"
    elif ratio > long_ratio:
        bucket = "too_long"
    else:
        bucket = "ok"

    pred_tokens = _tokens(prediction)
    art_tokens = _tokens(article)
    repeated, max_trigram_count = _trigram_repeats(pred_tokens)

    lowered = prediction.lower()
    # Empty markers are skipped: "" is in every string and would flag everything.
    template_leak = any(m and m.lower() in lowered for m in template_markers)

    novel_bigrams = _novel_share(pred_tokens, art_tokens, 2)
    has_bigrams = len(pred_tokens) >= 2
    numbers = _unsupported_numbers(prediction, article)
    names = _unsupported_names(prediction, article)

    return {
        "pred_words": pred_words,
        "ref_words": ref_words,
        "length_ratio": ratio,
        "length_bucket": bucket,
        "empty": empty,
        "repeated_trigram_share": repeated,
        "max_trigram_count": max_trigram_count,
        "repeats_trigram": max_trigram_count >= 2,
        "degenerate_repetition": max_trigram_count >= _LOOP_TRIGRAM_COUNT,
        "template_leak": template_leak,
        "run_on": stop_reason == "max_new_tokens" or template_leak,
        "novel_unigram_share": _novel_share(pred_tokens, art_tokens, 1),
        "novel_bigram_share": novel_bigrams,
        # Not 1 - 0.0 = 1.0 when there are no bigrams: an empty summary has copied nothing.
        "copied_bigram_share": 1.0 - novel_bigrams if has_bigrams else 0.0,
        "unsupported_numbers": numbers,
        "unsupported_names": names,
        "hallucination_flag": bool(numbers or names),
    }


def stopped_by_itself(stop_reason: str, prediction: str) -> bool:
    """The model ended its summary itself: EOS or a stop string, after some text. A stop string as
    the first thing it writes (a zero-shot model opening with "###") is an empty summary, not a stop."""
    return stop_reason in ("eos", "stop_string") and bool(prediction.strip())


def stopped_by_itself_count(metrics: dict, predictions: list[dict] | None = None) -> int | None:
    """How many of an evaluation's summaries stopped by themselves (`stopped_by_itself`), from its
    eval_metrics.json, or from its predictions.jsonl records when they cover every generated row.
    An older eval_metrics.json counted every EOS or stop string, empty summaries included; from its stop
    reasons and empty count the figure is exact only when no summary was empty or none ran to
    max_new_tokens, else None (unknown)."""
    if isinstance(metrics.get("stopped_by_itself"), int):
        return metrics["stopped_by_itself"]
    n = metrics.get("generated_rows")
    if predictions is not None and len(predictions) == n:
        return sum(stopped_by_itself(p.get("stop_reason", ""), p.get("prediction", "")) for p in predictions)
    stops, empty = metrics.get("stop_reasons"), metrics.get("errors", {}).get("empty")
    if not isinstance(stops, dict) or not isinstance(empty, int):
        return None
    if empty == 0 or stops.get("max_new_tokens") == 0:
        return stops.get("eos", 0) + stops.get("stop_string", 0) - empty
    return None


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def aggregate_errors(records: list[dict]) -> dict:
    """Counts and shares of each failure over `records` from analyze_example.

    The novelty and repetition means are over non-empty predictions only: those shares are
    undefined for an empty output (stored as 0.0 to keep records flat), and averaging the zeros
    in would make a model that often says nothing look extractive and loop-free. Empties are
    counted separately. The length ratio means include empties, where 0.0 is the true ratio.
    """
    n = len(records)
    if n == 0:
        return {"n": 0}
    out: dict = {"n": n}
    buckets = Counter(r["length_bucket"] for r in records)
    out["length_buckets"] = {b: buckets.get(b, 0) for b in LENGTH_BUCKETS}
    for flag in _FLAGS:
        count = sum(bool(r[flag]) for r in records)
        out[flag] = count
        out[f"{flag}_share"] = count / n
    ratios = [r["length_ratio"] for r in records]
    spoken = [r for r in records if not r["empty"]]
    out["mean_length_ratio"] = statistics.fmean(ratios)
    out["median_length_ratio"] = statistics.median(ratios)
    out["mean_novel_bigram_share"] = _mean([r["novel_bigram_share"] for r in spoken])
    out["mean_repeated_trigram_share"] = _mean([r["repeated_trigram_share"] for r in spoken])
    return out


def worst_examples(records: list[dict], scores: list[float], k: int = 5) -> list[int]:
    """Indices of the `k` lowest-scoring examples, lowest first; ties go to the earlier index.

    A NaN score (a metric that failed on that example) ranks as the worst, since it is exactly
    the kind of example worth reading, and NaN would otherwise make the sort order arbitrary.
    """
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} scores")
    def rank(i: int) -> tuple[bool, float, int]:
        nan = math.isnan(scores[i])
        return (not nan, 0.0 if nan else scores[i], i)

    return sorted(range(len(scores)), key=rank)[:max(k, 0)]


def excerpt(text: str, max_chars: int = 400) -> str:
    """At most `max_chars` characters of `text`, cut back to a word boundary, "…" marking a cut.

    A single word longer than `max_chars` is cut mid-word: showing something beats showing "…".
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if not text[max_chars].isspace():
        # Drop the partial word the cut landed in, back to the last whitespace.
        last_space = max((m.start() for m in re.finditer(r"\s", head)), default=0)
        if last_space > 0:
            head = head[:last_space]
    return head.rstrip() + "…"
