"""Error analysis on hand-made examples; every expected value below is worked out by hand."""

import json
import math

import pytest

from summ.errors import LENGTH_BUCKETS, aggregate_errors, analyze_example, excerpt, worst_examples

REF4 = "one two three four"  # 4 reference words makes the length ratios easy to read
COUNCIL = "The council approves the plan."

KEYS = {
    "pred_words", "ref_words", "length_ratio", "length_bucket", "empty", "repeated_trigram_share",
    "max_trigram_count", "repeats_trigram", "degenerate_repetition", "template_leak", "run_on",
    "novel_unigram_share", "novel_bigram_share",
    "copied_bigram_share", "unsupported_numbers", "unsupported_names", "hallucination_flag",
}


def analyze(prediction, article=COUNCIL, reference=REF4, stop_reason="eos", **kw):
    return analyze_example(article, reference, prediction, stop_reason=stop_reason, **kw)


# ----------------------------------------------------------------------------- record shape


def test_empty_prediction_record_is_exact():
    assert analyze("  \n\t") == {
        "pred_words": 0, "ref_words": 4, "length_ratio": 0.0, "length_bucket": "empty", "empty": True,
        "repeated_trigram_share": 0.0, "max_trigram_count": 0, "repeats_trigram": False,
        "degenerate_repetition": False, "template_leak": False, "run_on": False,
        "novel_unigram_share": 0.0, "novel_bigram_share": 0.0, "copied_bigram_share": 0.0,
        "unsupported_numbers": [], "unsupported_names": [], "hallucination_flag": False,
    }


def test_record_is_flat_and_json_round_trips():
    rec = analyze("Council approves £3.5m plan for 1,200 homes in Paris. ### Article:", stop_reason="max_new_tokens")
    assert set(rec) == KEYS
    assert json.loads(json.dumps(rec)) == rec
    # By hand: 11 whitespace words / 4 = 2.75 (too long). Tokens after deleting punctuation:
    # council approves 35m plan for 1200 homes in paris article (10, no repeated trigram); the article
    # "the council approves the plan" has council/approves/plan -> 7/10 novel unigrams, and of the 9
    # bigrams only "council approves" is copied -> 8/9 novel. "###" leaks the template. Numbers 3.5 and
    # 1,200 are not in the article (value order); "Paris" is capitalised mid-sentence and absent,
    # "Council" and "Article" open sentences and are exempt.
    assert rec == {
        "pred_words": 11, "ref_words": 4, "length_ratio": 2.75, "length_bucket": "too_long", "empty": False,
        "repeated_trigram_share": 0.0, "max_trigram_count": 1, "repeats_trigram": False,
        "degenerate_repetition": False, "template_leak": True, "run_on": True,
        "novel_unigram_share": pytest.approx(7 / 10), "novel_bigram_share": pytest.approx(8 / 9),
        "copied_bigram_share": pytest.approx(1 / 9), "unsupported_numbers": ["3.5", "1,200"],
        "unsupported_names": ["Paris"], "hallucination_flag": True,
    }


# ----------------------------------------------------------------------------- length


@pytest.mark.parametrize("prediction, words, ratio, bucket", [
    ("a", 1, 0.25, "too_short"),
    ("a b", 2, 0.5, "ok"),                     # exactly short_ratio is not too short
    ("a b c d e f g h", 8, 2.0, "ok"),         # exactly long_ratio is not too long
    ("a b c d e f g h i", 9, 2.25, "too_long"),
])
def test_length_buckets(prediction, words, ratio, bucket):
    rec = analyze(prediction)
    assert (rec["pred_words"], rec["ref_words"]) == (words, 4)
    assert rec["length_ratio"] == ratio
    assert rec["length_bucket"] == bucket
    assert rec["empty"] is False


def test_length_bucket_names_in_report_order():
    assert LENGTH_BUCKETS == ("empty", "too_short", "ok", "too_long")


def test_length_thresholds_are_configurable():
    assert analyze("a b", short_ratio=0.6)["length_bucket"] == "too_short"     # 0.5 < 0.6
    assert analyze("a b c d e", long_ratio=1.2)["length_bucket"] == "too_long"  # 1.25 > 1.2


def test_word_counts_are_whitespace_tokens():
    rec = analyze("Council approves plan. ### Vocabulary", reference="A  b\nc")
    assert (rec["pred_words"], rec["ref_words"]) == (5, 3)
    assert rec["length_ratio"] == 5 / 3


def test_empty_reference_gives_zero_ratio():
    rec = analyze("Council approves plan", reference="   ")
    assert (rec["ref_words"], rec["length_ratio"], rec["length_bucket"]) == (0, 0.0, "too_short")


# ----------------------------------------------------------------------------- repetition


def repetition(rec):
    return (rec["max_trigram_count"], rec["repeats_trigram"], rec["degenerate_repetition"])


def test_looping_prediction_is_degenerate():
    # 9 tokens -> 7 trigrams: (the cat sat) (cat sat the) (sat the cat) are new, the next 4 repeat;
    # (the cat sat) occurs 3 times.
    rec = analyze("the cat sat the cat sat the cat sat")
    assert rec["repeated_trigram_share"] == pytest.approx(4 / 7)
    assert repetition(rec) == (3, True, True)


def test_one_repeated_trigram_is_not_degenerate():
    # the council approved the plan and the council approved it: 10 tokens, 8 trigrams;
    # (the council approved) occurs twice, every other trigram once -> 1 repeat in 8.
    rec = analyze("The council approved the plan, and the council approved it.")
    assert rec["repeated_trigram_share"] == 1 / 8
    assert repetition(rec) == (2, True, False)


def test_unicef_loop_is_degenerate():
    # Commas and hyphens are deleted: unicef unicef then unicefunccp 6 times, 8 tokens, 6 trigrams:
    # (unicef unicef unicefunccp) (unicef unicefunccp unicefunccp) once, (unicefunccp x3) 4 times.
    rec = analyze("UNICEF, UNICEF, UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP, "
                  "UNICEF-UNCCP")
    assert rec["repeated_trigram_share"] == pytest.approx(3 / 6)
    assert repetition(rec) == (4, True, True)


def test_four_copies_of_one_token_repeat_a_trigram_only_twice():
    # unicef unicef unicefunccp x4: (unicefunccp x3) occurs twice, a repeat but not yet a loop.
    rec = analyze("UNICEF, UNICEF, UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP, UNICEF-UNCCP")
    assert rec["repeated_trigram_share"] == pytest.approx(1 / 4)
    assert repetition(rec) == (2, True, False)


def test_repetition_ignores_case_and_punctuation():
    # the cat sat the cat sat -> 4 trigrams, only the last (the cat sat) repeats: 1/4.
    rec = analyze("The cat sat. the CAT sat!")
    assert rec["repeated_trigram_share"] == 0.25
    assert repetition(rec) == (2, True, False)


def test_no_repeats():
    rec = analyze("the cat sat on the mat")
    assert rec["repeated_trigram_share"] == 0.0
    assert repetition(rec) == (1, False, False)


@pytest.mark.parametrize("prediction", ["the cat", "cat cat", "cat", ""])
def test_too_short_for_trigrams(prediction):
    rec = analyze(prediction)
    assert rec["repeated_trigram_share"] == 0.0
    assert repetition(rec) == (0, False, False)


def test_three_tokens_once_each_is_count_one():
    # Punctuation-only words leave no token: "cat - cat ! cat" is cat cat cat, one trigram once.
    rec = analyze("cat - cat ! cat")
    assert repetition(rec) == (1, False, False)


# ----------------------------------------------------------------------------- run-on


def test_template_leak_is_run_on():
    rec = analyze("Council approves plan. ### Vocabulary Exercises")
    assert rec["template_leak"] is True
    assert rec["run_on"] is True


def test_template_markers_are_case_insensitive_and_configurable():
    assert analyze("Council approves plan. summary: it does")["template_leak"] is True
    rec = analyze("Council approves plan. ### Vocabulary Exercises", template_markers=("Instruction:",))
    assert (rec["template_leak"], rec["run_on"]) == (False, False)
    assert analyze("Council approves plan.", template_markers=("",))["template_leak"] is False


def test_run_on_from_max_new_tokens_without_leak():
    rec = analyze("Council approves plan", stop_reason="max_new_tokens")
    assert (rec["template_leak"], rec["run_on"]) == (False, True)
    rec = analyze("Council approves plan", stop_reason="eos")
    assert (rec["template_leak"], rec["run_on"]) == (False, False)


# ----------------------------------------------------------------------------- abstractiveness

ARTICLE = "The council approved the new housing plan on Tuesday."


def test_fully_extractive_prediction():
    rec = analyze("The Council approved the new housing plan.", article=ARTICLE)
    assert rec["novel_unigram_share"] == 0.0
    assert rec["novel_bigram_share"] == 0.0
    assert rec["copied_bigram_share"] == 1.0


def test_fully_novel_prediction():
    rec = analyze("Ministers reject bold proposal", article=ARTICLE)
    assert rec["novel_unigram_share"] == 1.0
    assert rec["novel_bigram_share"] == 1.0
    assert rec["copied_bigram_share"] == 0.0


def test_partly_novel_prediction():
    # Unigrams: the council REJECTED the new plan -> 1/6 novel.
    # Bigrams: the-council, (council-rejected), (rejected-the), the-new, (new-plan) -> 3/5 novel;
    # "new plan" is novel although both words are in the article ("new housing plan").
    rec = analyze("The council rejected the new plan", article=ARTICLE)
    assert rec["novel_unigram_share"] == pytest.approx(1 / 6)
    assert rec["novel_bigram_share"] == pytest.approx(3 / 5)
    assert rec["copied_bigram_share"] == pytest.approx(2 / 5)


def test_single_token_has_no_bigrams_to_copy():
    rec = analyze("Council", article=ARTICLE)
    assert (rec["novel_unigram_share"], rec["novel_bigram_share"], rec["copied_bigram_share"]) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- numbers

NUM_ARTICLE = "Officials said 1200 homes would cost 3.5 million pounds, with 40 per cent for families, in 2019."


def test_supported_numbers_with_paraphrased_format():
    # 1,200 -> 1200 after dropping the comma; "3.5m" is the digits 3.5 (units are deliberately not
    # compared, so "3.5 million" supports it); "40%" is 40, which the article has as "40 per cent".
    prediction = "Council plans 1,200 homes for £3.5m, 40% for families"
    rec = analyze(prediction, article=NUM_ARTICLE)
    assert rec["unsupported_numbers"] == []
    assert rec["hallucination_flag"] is False
    # Control: all three are read as numbers, so the empty list above means "supported", not "not seen".
    rec = analyze(prediction, article="Officials said homes would cost millions.")
    assert rec["unsupported_numbers"] == ["3.5", "40%", "1,200"]
    assert rec["hallucination_flag"] is True


def test_comma_normalisation_works_both_ways():
    rec = analyze("Council plans 1200 homes", article="The council plans 1,200 homes.")
    assert rec["unsupported_numbers"] == []
    assert analyze("Council plans 1200 homes", article="The council plans 1,300 homes.")["unsupported_numbers"] \
        == ["1200"]


def test_unsupported_numbers_sorted_by_value_as_written():
    # 2019 is in the article; 19 is not, although it is a substring of 2019; nor are 9 and 12
    # (12 is a substring of 1200). Value order puts "9%" before "12" (string order would not).
    rec = analyze("Only 12 homes, up 9% since 2019 and 19 last year", article=NUM_ARTICLE)
    assert rec["unsupported_numbers"] == ["9%", "12", "19"]
    assert rec["unsupported_names"] == []
    assert rec["hallucination_flag"] is True


def test_decimal_point_matters_and_codes_are_not_numbers():
    rec = analyze("Council spends 3.5m", article="The council spends 35 million.")
    assert rec["unsupported_numbers"] == ["3.5"]
    assert analyze("G7 leaders met", article="Leaders met.")["unsupported_numbers"] == []


# ----------------------------------------------------------------------------- names

NAME_ARTICLE = "Mayor Jane Smith of Leeds welcomed the vote, the BBC reported. Parisian cafes were shut."


def test_unsupported_name_flags_hallucination():
    # "The" opens the sentence and is a function word; "Jane Smith" is in the article; "Paris" is not,
    # and "Parisian" does not support it because names are matched at word edges.
    rec = analyze("The plan was backed by Jane Smith in Paris.", article=NAME_ARTICLE)
    assert rec["unsupported_names"] == ["Paris"]
    assert rec["unsupported_numbers"] == []
    assert rec["hallucination_flag"] is True


def test_supported_names():
    # "Mayor Smith" is not in the article as a phrase, but both of its words are.
    prediction = "The vote in Leeds was welcomed by Mayor Smith, the BBC said."
    rec = analyze(prediction, article=NAME_ARTICLE)
    assert rec["unsupported_names"] == []
    assert rec["hallucination_flag"] is False
    # Control: the same names against an article without them are all found and flagged.
    rec = analyze(prediction, article=COUNCIL)
    assert rec["unsupported_names"] == ["BBC", "Leeds", "Mayor Smith"]
    assert rec["hallucination_flag"] is True


def test_acronyms_are_names_and_matching_is_case_sensitive():
    rec = analyze("The council told the BBC it agreed.", article="the council agreed, the bbc said.")
    assert rec["unsupported_names"] == ["BBC"]


def test_multi_word_name_needs_every_word():
    rec = analyze("The vote was welcomed by Jane Doe.", article=NAME_ARTICLE)
    assert rec["unsupported_names"] == ["Jane Doe"]


def test_sentence_initial_words_count_only_when_also_capitalised_mid_sentence():
    # The documented blind spot: a name that only ever opens a sentence is not checked ...
    assert analyze("Paris approved it.", article=NAME_ARTICLE)["unsupported_names"] == []
    # ... but once it also appears mid-sentence, the sentence-initial use counts as well.
    rec = analyze("Paris approved it. Officials in Paris agreed.", article=NAME_ARTICLE)
    assert rec["unsupported_names"] == ["Paris"]


def test_leaked_template_words_read_as_names():
    # "###" is not a word, so "Vocabulary" opens the second sentence and is exempt; "Exercises" is not.
    rec = analyze("Council approves plan. ### Vocabulary Exercises")
    assert rec["unsupported_names"] == ["Exercises"]
    assert rec["hallucination_flag"] is True


# ----------------------------------------------------------------------------- aggregate


def batch():
    return [
        # ratio 0.0, empty
        analyze(""),
        # 9/4 = 2.25 too_long; repeats 4/7; bigrams: 8, of which the two "sat the" are novel -> 0.25
        analyze("the cat sat the cat sat the cat sat", article="the cat sat on the mat"),
        # 6/4 = 1.5 ok; leak + run_on; "Exercises" unsupported; bigrams: council-approves is in the
        # article, approves-plan / plan-vocabulary / vocabulary-exercises are not -> 0.75
        analyze("Council approves plan. ### Vocabulary Exercises"),
        # 5/4 = 1.25 ok; run_on without leak; fully extractive
        analyze("The council approves the plan", stop_reason="max_new_tokens"),
        # 1/4 = 0.25 too_short
        analyze("Council"),
    ]


def test_batch_records_are_as_worked_out():
    recs = batch()
    assert [r["length_ratio"] for r in recs] == [0.0, 2.25, 1.5, 1.25, 0.25]
    assert [r["novel_bigram_share"] for r in recs] == [0.0, 0.25, 0.75, 0.0, 0.0]
    assert [r["run_on"] for r in recs] == [False, False, True, True, False]
    assert [r["unsupported_names"] for r in recs] == [[], [], ["Exercises"], [], []]


def test_aggregate_counts_and_shares():
    agg = aggregate_errors(batch())
    assert agg["n"] == 5
    assert agg["length_buckets"] == {"empty": 1, "too_short": 1, "ok": 2, "too_long": 1}
    assert list(agg["length_buckets"]) == ["empty", "too_short", "ok", "too_long"]  # dict == ignores order
    counts = {"empty": 1, "repeats_trigram": 1, "degenerate_repetition": 1, "template_leak": 1, "run_on": 2,
              "hallucination_flag": 1}
    for flag, count in counts.items():
        assert agg[flag] == count
        assert agg[f"{flag}_share"] == count / 5
    assert agg["mean_length_ratio"] == pytest.approx(5.25 / 5)
    assert agg["median_length_ratio"] == 1.25  # of 0, 0.25, 1.25, 1.5, 2.25
    # Means over the 4 non-empty predictions: the empty one would pull these down to 0.2 and 4/35.
    assert agg["mean_novel_bigram_share"] == pytest.approx(1.0 / 4)
    assert agg["mean_repeated_trigram_share"] == pytest.approx((4 / 7) / 4)


def test_aggregate_of_json_round_tripped_records_and_of_nothing():
    recs = json.loads(json.dumps(batch()))
    assert aggregate_errors(recs) == aggregate_errors(batch())
    assert aggregate_errors([]) == {"n": 0}
    only_empty = aggregate_errors([analyze("")])
    assert (only_empty["mean_novel_bigram_share"], only_empty["length_buckets"]["empty"]) == (0.0, 1)


# ----------------------------------------------------------------------------- worst examples


def test_worst_examples_lowest_first_ties_by_index():
    scores = [0.3, 0.1, 0.3, 0.1, 0.5]
    recs = [{}] * 5
    assert worst_examples(recs, scores, k=3) == [1, 3, 0]
    assert worst_examples(recs, scores) == [1, 3, 0, 2, 4]
    assert worst_examples(recs, scores, k=0) == []


def test_worst_examples_nan_first_and_length_mismatch():
    assert worst_examples([{}] * 3, [0.2, math.nan, 0.1], k=2) == [1, 2]
    with pytest.raises(ValueError, match="^2 records but 3 scores$"):
        worst_examples([{}] * 2, [0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- excerpt


@pytest.mark.parametrize("max_chars, expected", [
    (9, "the quick…"),    # cut lands on the space after "quick"
    (10, "the quick…"),   # cut lands at the start of "brown": drop it entirely
    (12, "the quick…"),   # cut lands inside "brown"
    (19, "the quick brown fox"),
    (50, "the quick brown fox"),
])
def test_excerpt_cuts_at_word_boundary(max_chars, expected):
    assert excerpt("the quick brown fox", max_chars) == expected


def test_excerpt_strips_whitespace_before_the_mark():
    # "the quick  brown": the cut at 10 lands on the second of two spaces, so the head "the quick "
    # ends in whitespace, which must not sit between the text and the "…".
    assert excerpt("the quick  brown fox", 10) == "the quick…"
    assert excerpt("the quick \n brown fox", 11) == "the quick…"


def test_excerpt_long_word_and_default():
    assert excerpt("abcdefghij", 4) == "abcd…"
    text = "word " * 100
    # 400 chars = 80 whole words; the trailing space is dropped before the mark.
    assert excerpt(text) == ("word " * 80).rstrip() + "…"
    with pytest.raises(ValueError, match="^max_chars must be positive, got 0$"):
        excerpt("text", 0)
