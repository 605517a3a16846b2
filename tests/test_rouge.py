"""ROUGE scores against hand-computed values, the sentence splitter on hard cases, and the bootstrap CI."""

import numpy as np
import pytest
from rouge_score import rouge_scorer

from summ.rouge import (ROUGE_KEYS, aggregate, bootstrap_ci, score_pairs, split_sentences, unicode_tokens,
                        uses_unicode_tokens)


# ----------------------------------------------------------------------------- ROUGE by hand

def test_rouge_simple_pair_by_hand():
    # pred: the cat sat on the mat  (6 tokens; all <= 3 chars, so the stemmer leaves them alone)
    # ref : the cat lay on the mat  (6 tokens)
    # unigrams: pred {the:2, cat, sat, on, mat}, ref {the:2, cat, lay, on, mat}
    #   clipped overlap = the 2 + cat 1 + on 1 + mat 1 = 5 -> P = 5/6, R = 5/6, F1 = 5/6
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat lay, lay on, on the, the mat}
    #   overlap = {the cat, on the, the mat} = 3 of 5 each side -> F1 = 3/5
    # LCS: "the cat on the mat" = 5 -> P = R = 5/6 -> F1 = 5/6; one sentence, so rougeLsum = rougeL
    [s] = score_pairs(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert s["rouge1"] == pytest.approx(100 * 5 / 6)
    assert s["rouge2"] == pytest.approx(100 * 3 / 5)
    assert s["rougeL"] == pytest.approx(100 * 5 / 6)
    assert s["rougeLsum"] == pytest.approx(100 * 5 / 6)
    assert set(s) == set(ROUGE_KEYS)


def test_rouge_uses_porter_stemming_by_hand():
    # Stemming applies to tokens longer than 3 chars: dogs -> dog, running -> run, runs -> run, were -> were.
    # pred: the dog were run (4) ; ref: the dog run (3)   ("dog" in ref is 3 chars, unstemmed)
    # unigrams: overlap {the, dog, run} = 3 -> P = 3/4, R = 3/3 -> F1 = 2*(3/4)/(7/4) = 6/7
    # bigrams: pred {the dog, dog were, were run}, ref {the dog, dog run} -> overlap 1
    #   P = 1/3, R = 1/2 -> F1 = 2*(1/6)/(5/6) = 2/5
    # LCS: "the dog run" = 3 -> same as unigrams, 6/7
    # Without stemming, "running"/"runs" and "dogs"/"dog" would not match: rouge1 would be 1 overlap only.
    [s] = score_pairs(["the dogs were running"], ["the dog runs"])
    assert s["rouge1"] == pytest.approx(100 * 6 / 7)
    assert s["rouge2"] == pytest.approx(100 * 2 / 5)
    assert s["rougeL"] == pytest.approx(100 * 6 / 7)
    assert s["rougeLsum"] == pytest.approx(100 * 6 / 7)


def test_rougelsum_is_summary_level_union_lcs_by_hand():
    # ref : "The cat sat. The dog ran."  -> tokens the cat sat the dog ran (6); sentences r1, r2
    # pred: "The dog ran. The cat sat."  -> tokens the dog ran the cat sat (6); sentences c1, c2
    # rouge1: same bag of words -> 100
    # rouge2: ref {the cat, cat sat, sat the, the dog, dog ran}, pred {the dog, dog ran, ran the, the cat,
    #   cat sat} -> overlap 4 of 5 -> 80
    # rougeL (whole text as one sequence): the two halves are swapped, so the LCS can only follow one half:
    #   "the cat sat" or "the dog ran" = 3 -> P = R = 3/6 -> 50
    # rougeLsum (one sentence per line, union LCS per reference sentence):
    #   r1 "the cat sat": LCS(r1, c1 "the dog ran") = {the}; LCS(r1, c2 "the cat sat") = {the, cat, sat}
    #     union = {the, cat, sat} -> 3 hits
    #   r2 "the dog ran": LCS(r2, c1) = {the, dog, ran}; LCS(r2, c2) = {the} -> union 3 hits
    #   total 6 -> R = 6/6, P = 6/6 -> 100
    [s] = score_pairs(["The dog ran. The cat sat."], ["The cat sat. The dog ran."])
    assert s["rouge1"] == pytest.approx(100.0)
    assert s["rouge2"] == pytest.approx(80.0)
    assert s["rougeL"] == pytest.approx(50.0)
    assert s["rougeLsum"] == pytest.approx(100.0)


def test_rougelsum_union_across_two_candidate_sentences_by_hand():
    # ref : "Police arrested a man. He was charged." -> r1 polic arrest a man (4), r2 he was charg (3)
    #   (stems: police -> polic, arrested -> arrest, charged -> charg; "was" has 3 chars, so it is not stemmed)
    # pred: "A man was charged. Police arrested him."  -> c1 a man was charg (4), c2 polic arrest him (3)
    # tokens ref: polic arrest a man he was charg (7); pred: a man was charg polic arrest him (7)
    # rougeL (one sequence): best LCS is "a man was charg" = 4 -> P = R = 4/7 -> F1 = 4/7
    # rougeLsum:
    #   r1 "polic arrest a man": LCS with c1 = {a, man}; with c2 = {polic, arrest} -> union 4 hits
    #   r2 "he was charg": LCS with c1 = {was, charg}; with c2 = {} -> union 2 hits
    #   total 6 -> P = R = 6/7 -> F1 = 6/7
    [s] = score_pairs(["A man was charged. Police arrested him."], ["Police arrested a man. He was charged."])
    assert s["rougeL"] == pytest.approx(100 * 4 / 7)
    assert s["rougeLsum"] == pytest.approx(100 * 6 / 7)


@pytest.mark.parametrize("prediction", ["", "   ", "\n\n"])
def test_empty_prediction_scores_zero(prediction):
    [s] = score_pairs([prediction], ["The cat sat on the mat."])
    assert s == {key: 0.0 for key in ROUGE_KEYS}


def test_ngram_and_rougel_scores_equal_raw_text_scores():
    # score_pairs scores the one-sentence-per-line text once; rouge1/2/L must still equal raw-text scores.
    raw = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    preds = ['Mr. Smith paid £1.2m. "Stop." Then he left... Why? Because!',
             "U.S. officials met e.g. J. K. Rowling at 3.5 p.m.\nThe end .",
             "no punctuation at all here"]
    refs = ["Mr. Smith paid 1.2 million pounds. He left.", "Officials in the U.S. met the author .\nEnd .",
            "The punctuation is missing. All here."]
    for s, p, r in zip(score_pairs(preds, refs), preds, refs):
        expected = raw.score(r, p)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert s[key] == pytest.approx(100 * expected[key].fmeasure)


def test_cnn_highlights_are_split_on_newlines_for_rougelsum():
    # Each highlight is its own sentence. Same tokens, highlights swapped: rougeL 50, rougeLsum 100
    # (same arithmetic as the union-LCS test above).
    ref = "the cat sat .\nthe dog ran ."
    pred = "the dog ran .\nthe cat sat ."
    [s] = score_pairs([pred], [ref])
    assert s["rougeL"] == pytest.approx(50.0)
    assert s["rougeLsum"] == pytest.approx(100.0)


def test_score_pairs_length_mismatch_raises():
    with pytest.raises(ValueError, match=r"^predictions and references differ in length: "
                                         r"2 predictions vs 1 references$"):
        score_pairs(["a", "b"], ["a"])


def test_score_pairs_returns_one_dict_per_pair_in_order():
    # Pair 0 is identical ("the cat": one bigram, matched); pair 1 shares no token.
    out = score_pairs(["the cat", "completely different"], ["the cat", "the cat"])
    assert out == [{key: pytest.approx(100.0) for key in ROUGE_KEYS}, {key: 0.0 for key in ROUGE_KEYS}]
    # Swapping the pairs swaps the results: order follows the input, not the score.
    assert score_pairs(["completely different", "the cat"], ["the cat", "the cat"]) == out[::-1]


# ----------------------------------------------------------------------------- sentence splitter

@pytest.mark.parametrize("text, expected", [
    # titles and abbreviations
    ("Mr. Smith met Mrs. Jones and Dr. Brown. They talked.",
     ["Mr. Smith met Mrs. Jones and Dr. Brown.", "They talked."]),
    ("Prof. White, Sen. Black, Gov. Green, Gen. Gray and Rep. Blue spoke. Nobody listened.",
     ["Prof. White, Sen. Black, Gov. Green, Gen. Gray and Rep. Blue spoke.", "Nobody listened."]),
    ("Martin Luther King Jr. Day is a holiday. Schools close.",
     ["Martin Luther King Jr. Day is a holiday.", "Schools close."]),
    ("Apple Inc. Chief Executive Tim Cook spoke. Acme Ltd. Shares and Foo Corp. Bonds fell.",
     ["Apple Inc. Chief Executive Tim Cook spoke.", "Acme Ltd. Shares and Foo Corp. Bonds fell."]),
    ("The deal was struck by Google Inc. The price was not disclosed.",
     ["The deal was struck by Google Inc.", "The price was not disclosed."]),
    ("It was Chelsea vs. Arsenal. Chelsea won.", ["It was Chelsea vs. Arsenal.", "Chelsea won."]),
    ("Bring fruit, e.g. Apples or pears, i.e. Anything fresh. Thanks.",
     ["Bring fruit, e.g. Apples or pears, i.e. Anything fresh.", "Thanks."]),
    ("Apples, pears, etc. are fine. Bananas are not.", ["Apples, pears, etc. are fine.", "Bananas are not."]),
    ("He lives at No. 10 Downing St. in London. He said no. Then he left.",
     ["He lives at No. 10 Downing St. in London.", "He said no.", "Then he left."]),
    ("It opened on Jan. 5 and closed on Sept. 11. Dec. 25 is Christmas.",
     ["It opened on Jan. 5 and closed on Sept. 11.", "Dec. 25 is Christmas."]),
    # dotted acronyms: mid-sentence before a name, final before a sentence opener
    ("The U.S. Army and the U.K. Government met at the U.N. Headquarters. Talks ended.",
     ["The U.S. Army and the U.K. Government met at the U.N. Headquarters.", "Talks ended."]),
    ("He moved to the U.S. The weather was better.", ["He moved to the U.S.", "The weather was better."]),
    ("The meeting ended at 5 p.m. It had lasted hours.", ["The meeting ended at 5 p.m.", "It had lasted hours."]),
    # initials
    ("J. K. Rowling wrote it. George W. Bush read it.", ["J. K. Rowling wrote it.", "George W. Bush read it."]),
    # decimals, currency, versions
    ("Growth was 3.5 per cent. It cost £1.2m last year. Version v2.0 shipped in 2015. Sales rose.",
     ["Growth was 3.5 per cent.", "It cost £1.2m last year.", "Version v2.0 shipped in 2015.", "Sales rose."]),
    ("He scored 7.5. 12 people watched.", ["He scored 7.5.", "12 people watched."]),
    # quotes and brackets after the final punctuation
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She shouted 'Run!' Everyone ran.", ["She shouted 'Run!'", "Everyone ran."]),
    ("(He had left.) Then she came.", ["(He had left.)", "Then she came."]),
    ('He left. "I\'m done," she said.', ["He left.", '"I\'m done," she said.']),
    ('"Why?" he asked. Nobody answered.', ['"Why?" he asked.', "Nobody answered."]),
    # ellipsis
    ("I don't know... Maybe tomorrow.", ["I don't know...", "Maybe tomorrow."]),
    ("Wait... what happened?", ["Wait... what happened?"]),
    ("It was… Fine.", ["It was…", "Fine."]),
    # question and exclamation marks
    ("Is it over? Yes! Really?! Absolutely.", ["Is it over?", "Yes!", "Really?!", "Absolutely."]),
    # a lowercase word after a period continues the sentence
    ("The fee is approx. five pounds. Pay now.", ["The fee is approx. five pounds.", "Pay now."]),
    # newlines always split, even without punctuation; blank lines and whitespace disappear
    ("first line\nsecond line\n\n  third line  \n", ["first line", "second line", "third line"]),
    # CNN/DailyMail highlights: " ." endings, one highlight per line
    ("Police arrest man , 32 .\nHe was found in the U.S. .\nTrial set for Jan. 5 .",
     ["Police arrest man , 32 .", "He was found in the U.S. .", "Trial set for Jan. 5 ."]),
    ("Highlight one . Highlight two .", ["Highlight one .", "Highlight two ."]),
    ("", []),
    ("   \n  ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_preserves_every_non_space_character():
    text = 'Mr. Smith paid £1.2m... "Why?" he asked. (U.S. data.) Then\nnothing .'
    sentences = split_sentences(text)
    assert "".join("".join(sentences).split()) == "".join(text.split())
    # By hand: "Mr." never ends one; the ellipsis before a quote does; "Why?" before lowercase "he"
    # does not; "asked." before "(" does; "(U.S." before lowercase "data" does not; the newline splits.
    assert sentences == ['Mr. Smith paid £1.2m...', '"Why?" he asked.', "(U.S. data.)", "Then", "nothing ."]


def test_split_sentences_is_linear_on_long_tokens():
    # A long unbroken token (URL, table) must not make the scan quadratic.
    text = "x" * 200_000 + ". The end."
    assert split_sentences(text) == ["x" * 200_000 + ".", "The end."]


# ----------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("confidence, interval", [
    # Two values {0, 1}: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    # 60%: the 20th percentile is 0 (P(0) = 25% > 20%) and the 80th is 1 (P(<= 0.5) = 75% < 80%).
    (0.60, (0.0, 1.0)),
    # 40%: the 30th and 70th percentiles both fall inside the 50% mass at 0.5.
    (0.40, (0.5, 0.5)),
])
def test_bootstrap_interval_on_two_values_by_hand(confidence, interval):
    # 4000 resamples keep the empirical shares (25% +- 0.7% sd) far from the 20%/30% cut points.
    mean, low, high = bootstrap_ci([0.0, 1.0], n_resamples=4000, confidence=confidence, seed=0)
    assert (mean, low, high) == (0.5, *interval)


def test_bootstrap_mean_is_numpy_mean_and_bounds_it():
    values = list(np.random.default_rng(1).uniform(0, 100, size=200))
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(float(np.mean(values)))
    assert low <= mean <= high
    assert low < high


def test_bootstrap_is_deterministic_for_a_seed():
    values = list(np.random.default_rng(2).normal(40, 10, size=100))
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_interval_narrows_with_more_data():
    rng = np.random.default_rng(3)
    _, low_small, high_small = bootstrap_ci(list(rng.normal(40, 10, size=10)))
    _, low_big, high_big = bootstrap_ci(list(rng.normal(40, 10, size=1000)))
    # Width scales ~ 1/sqrt(n): 10x narrower expected for 100x the data; demand at least 4x.
    assert (high_big - low_big) * 4 < (high_small - low_small)


def test_bootstrap_width_matches_normal_theory():
    # For n = 2000 the 95% percentile interval is close to mean +- 1.96 * sd / sqrt(n).
    values = np.random.default_rng(4).normal(40, 10, size=2000)
    mean, low, high = bootstrap_ci(list(values), n_resamples=2000)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_bootstrap_confidence_level_widens_interval():
    values = list(np.random.default_rng(5).normal(40, 10, size=300))
    _, low90, high90 = bootstrap_ci(values, confidence=0.90)
    _, low99, high99 = bootstrap_ci(values, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_bootstrap_constant_and_single_value():
    assert bootstrap_ci([0.3] * 50) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    mean, low, high = bootstrap_ci([0.3] * 50)
    assert low == mean == high
    assert bootstrap_ci([42.0]) == (42.0, 42.0, 42.0)


def test_bootstrap_empty_and_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"^bootstrap_ci needs a non-empty 1-D list of values, got shape \(0,\)$"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"^confidence must be in \(0, 1\), got 1.5$"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match=r"^n_resamples must be >= 1, got 0$"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)


def test_aggregate_reports_mean_and_interval_per_key():
    per_example = score_pairs(
        ["the cat sat on the mat", "the dogs were running", "", "The dog ran. The cat sat."],
        ["the cat lay on the mat", "the dog runs", "anything", "The cat sat. The dog ran."])
    out = aggregate(per_example, n_resamples=500, seed=0)
    assert set(out) == set(ROUGE_KEYS)
    # Means by hand from the per-pair values worked out in the tests above (the empty prediction scores 0):
    means = {
        "rouge1": (100 * 5 / 6 + 100 * 6 / 7 + 0 + 100) / 4,
        "rouge2": (100 * 3 / 5 + 100 * 2 / 5 + 0 + 80) / 4,
        "rougeL": (100 * 5 / 6 + 100 * 6 / 7 + 0 + 50) / 4,
        "rougeLsum": (100 * 5 / 6 + 100 * 6 / 7 + 0 + 100) / 4,
    }
    for key in ROUGE_KEYS:
        assert set(out[key]) == {"mean", "low", "high"}
        assert out[key]["mean"] == pytest.approx(means[key])
        # Each interval is this key's own bootstrap (same seed and resamples), not another key's.
        scores = [row[key] for row in per_example]
        assert (out[key]["low"], out[key]["high"]) == bootstrap_ci(scores, n_resamples=500, seed=0)[1:]
        assert out[key]["low"] < out[key]["mean"] < out[key]["high"]
    assert aggregate(per_example, n_resamples=500, seed=0) == out
    with pytest.raises(ValueError, match="^aggregate needs at least one scored example$"):
        aggregate([])


@pytest.mark.parametrize("text", [
    "مرحبا بالعالم، هذا اختبار للتلخيص.",            # Arabic
    "שלום עולם, זה מבחן של סיכום.",                 # Hebrew
    "東京は今日晴れです。明日は雨でしょう。",          # Japanese: kanji and kana, no spaces
    "北京今天下雨了，气温很低。",                      # Chinese
    "Привет, мир! Это тест резюме.",                  # Cyrillic
    "🎉🔥 👍",                                         # emoji only
])
def test_a_prediction_equal_to_its_reference_scores_100_in_any_script(text):
    assert score_pairs([text], [text]) == [{key: 100.0 for key in ROUGE_KEYS}]


def test_scripts_without_spaces_are_scored_by_character():
    # 東京は雨 / 東京は晴れ: 3 of 4 predicted and of 5 reference characters shared; bigrams 2 of 3 and of 4.
    scores = score_pairs(["東京は雨"], ["東京は晴れ"])[0]
    assert scores["rouge1"] == pytest.approx(100 * 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert scores["rouge2"] == pytest.approx(100 * 4 / 7)
    assert unicode_tokens("Москва, 2024: ГОРОД!") == ["москва", "2024", "город"]


def test_english_keeps_the_published_tokenizer_and_stemmer():
    # Porter stemming makes "approves" and "approved" one token; an accented name does not switch scripts.
    assert not uses_unicode_tokens("Zoë Smith approved the plan")
    assert score_pairs(["The council approves plans"], ["The council approved the plan"])[0]["rouge1"] == \
        pytest.approx(100 * 2 * (4 / 4) * (4 / 5) / (4 / 4 + 4 / 5))


def test_a_reference_without_tokens_is_warned(caplog):
    assert score_pairs(["a summary", "plan approved"], ["...", "plan approved"]) == [{key: 0.0 for key in ROUGE_KEYS},
                                                                                 {key: 100.0 for key in ROUGE_KEYS}]
    assert "ROUGE: 1 of 2 references have no tokens to score (rows 1); they score 0 whatever the prediction" \
        in caplog.text
