"""The repetition rules over the generated summary only, against transformers' own processors
applied to the same tokens, and the difference that matters: an article's n-gram may be copied."""

import pytest
import torch
from transformers import AutoTokenizer, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from summ.config import ConfigError
from summ.repetition import SummaryOnlyRepetition, ban_repeated_ngrams, penalize_repeated_tokens, token_classes
from summ.summaries import ngram_classes
from tests.conftest import TINY, tiny_config

VOCAB = 12


def random_case(seed: int, rows: int = 4, width: int = 10):
    g = torch.Generator().manual_seed(seed)
    # A small vocabulary, so rows repeat n-grams often.
    generated = torch.randint(0, 5, (rows, width), generator=g)
    scores = torch.randn((rows, VOCAB), generator=g)
    return generated, scores


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ban_equals_transformers_processor_on_the_tokens_written_so_far(n):
    """Static shapes (the fast engine's buffer of max_new_tokens, `length` of them written) give
    transformers' ban on the written tokens, with `length` an int or a tensor (a captured step)."""
    bans = 0
    for seed in range(3):
        generated, scores = random_case(seed)
        for length in range(generated.shape[1] + 1):
            expected = NoRepeatNGramLogitsProcessor(n)(generated[:, :length], scores.clone())
            assert torch.equal(ban_repeated_ngrams(scores, generated, length, n), expected)
            assert torch.equal(ban_repeated_ngrams(scores, generated, torch.tensor(length), n), expected)
            bans += int(torch.isinf(expected).sum())
    assert bans > 0  # the comparison above is not between two no-ops


def test_penalty_equals_transformers_processor_on_the_tokens_written_so_far():
    for seed in range(3):
        generated, scores = random_case(seed)
        for length in range(generated.shape[1] + 1):
            expected = RepetitionPenaltyLogitsProcessor(1.3)(generated[:, :length], scores.clone())
            assert torch.equal(penalize_repeated_tokens(scores, generated, length, 1.3), expected)
            assert torch.equal(penalize_repeated_tokens(scores, generated, torch.tensor(length), 1.3), expected)


def test_an_article_trigram_may_be_copied_a_summary_trigram_may_not_come_back():
    prompt = [5, 6, 7, 8]
    scores = torch.zeros((1, VOCAB))
    summary_rule = SummaryOnlyRepetition(len(prompt), no_repeat_ngram_size=3, repetition_penalty=1.0)

    # The summary so far ends with "5 6": the article's "5 6 7" may be copied...
    input_ids = torch.tensor([prompt + [9, 5, 6]])
    assert not torch.isinf(summary_rule(input_ids, scores.clone())).any()
    # ...which transformers' rule over the whole sequence forbids.
    banned = NoRepeatNGramLogitsProcessor(3)(input_ids, scores.clone())
    assert torch.isinf(banned[0]).nonzero().flatten().tolist() == [7]

    # Once the summary holds "5 6 7", a second "5 6" may not be followed by 7 again.
    input_ids = torch.tensor([prompt + [5, 6, 7, 9, 5, 6]])
    assert torch.isinf(summary_rule(input_ids, scores.clone())[0]).nonzero().flatten().tolist() == [7]


def test_penalty_spares_article_tokens():
    prompt = [1, 2, 3]
    scores = torch.full((1, VOCAB), 2.0)
    out = SummaryOnlyRepetition(len(prompt), no_repeat_ngram_size=0, repetition_penalty=2.0)(
        torch.tensor([prompt + [3, 4]]), scores.clone())
    assert out[0].tolist() == [2.0, 2.0, 2.0, 1.0, 1.0] + [2.0] * (VOCAB - 5)


def test_rows_and_beams_keep_their_own_summaries():
    """Left-padded rows (and beams) share the prompt width; each row's ban comes from its own summary."""
    rule = SummaryOnlyRepetition(2, no_repeat_ngram_size=2, repetition_penalty=1.0)
    input_ids = torch.tensor([[0, 1, 4, 5, 4], [1, 1, 6, 7, 6]])
    out = rule(input_ids, torch.zeros((2, VOCAB)))
    assert [torch.isinf(row).nonzero().flatten().tolist() for row in out] == [[5], [7]]


def test_ignore_case_classes_join_a_capitalised_word_and_its_lowercase_form():
    """eval.no_repeat_ignore_case on the Phi-2 tokenizer: after "the council met. The council", " met"
    and every other spelling of it ("met", " Met") are banned; by token ids nothing is."""
    tok = AutoTokenizer.from_pretrained(TINY["phi"]["model"])
    classes = token_classes(tok, 51200)
    ids = tok(" the council met. The council")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Ġthe", "Ġcouncil", "Ġmet", ".", "ĠThe", "Ġcouncil"]
    assert classes[tok.convert_tokens_to_ids("ĠThe")] == classes[ids[0]] == min(ids[0], tok.convert_tokens_to_ids("The"), tok.convert_tokens_to_ids("ĠThe"))
    eos = tok.eos_token_id
    assert classes[eos] == eos and classes[51199] == 51199  # special, and past the tokenizer
    generated, scores = torch.tensor([ids]), torch.zeros((1, 51200))
    by_class = ban_repeated_ngrams(scores, generated, len(ids), 3, torch.tensor(classes))
    banned = set(torch.isinf(by_class[0]).nonzero().flatten().tolist())
    assert {tok.convert_tokens_to_ids(t) for t in ("Ġmet", "met", "ĠMet", "Met")} <= banned
    assert {tok.decode([i]).strip().lower() for i in banned} == {"met"}
    assert not torch.isinf(ban_repeated_ngrams(scores, generated, len(ids), 3)).any()


def test_token_classes_are_computed_once_per_tokenizer():
    """Every evaluation asks for the classes; decoding the whole vocabulary again would add up to a
    second to each one. Another tokenizer gets its own."""
    tok = AutoTokenizer.from_pretrained(TINY["phi"]["model"])
    assert token_classes(tok, 51200) is token_classes(tok, 51200)
    other = AutoTokenizer.from_pretrained(TINY["phi"]["model"])
    assert token_classes(other, 51200) is not token_classes(tok, 51200)
    assert token_classes(other, 51200) == token_classes(tok, 51200)


def test_ignore_case_needs_the_summary_ban(tmp_path):
    with pytest.raises(ConfigError, match=r"^tiny: 'eval.no_repeat_ignore_case' must be false with "
                                          r"eval.repetition_scope 'sequence' \(transformers' ban compares token "
                                          r"ids\), got True$"):
        tiny_config(tmp_path, eval={"no_repeat_ignore_case": True, "no_repeat_ngram_size": 3,
                                    "repetition_scope": "sequence"})
    # The ban switched off: the key acts on nothing, so a config that ships it still turns the ban off with one key.
    ev = tiny_config(tmp_path, eval={"no_repeat_ignore_case": True, "no_repeat_ngram_size": 0}).eval
    assert ngram_classes(ev, model=None, tokenizer=None) is None
