"""The fast greedy decoder against transformers' `generate`: the same new ids, row for row, on
tiny random models of the real architectures with a LoRA adapter that changes the output, on a
dynamic cache and on the static cache with fixed batch shapes that the CUDA-graph path uses."""

import json

import pytest
import torch
from transformers import LogitsProcessorList

from summ.data import Encoder
from summ.summaries import finish_generation
from summ.generate import CHECK_EVERY, GreedyDecoder, stop_candidates
from summ.model import load_base_model, load_tokenizer, peft_lora_config
from summ.repetition import SummaryOnlyRepetition, token_classes
from tests.conftest import FIXTURES, gpu, tiny_config

CPU = torch.device("cpu")
NEW = 12


@pytest.fixture(scope="module", params=[("phi", False), ("llama", True)], ids=["phi", "llama-4bit"])
def lora_model(request, tmp_path_factory):
    """A tiny random model (Phi-2 in fp32; TinyLlama in 4-bit) with a LoRA adapter whose update is
    not zero, its tokenizer and five prompts of different lengths."""
    from peft import get_peft_model

    arch, quant = request.param
    cfg = tiny_config(tmp_path_factory.mktemp(arch), arch=arch, quant=quant)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, CPU, torch.float32)
    model = get_peft_model(model, peft_lora_config(cfg, model.config.model_type))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.eval()
    data = FIXTURES / ("xsum_tiny" if arch == "phi" else "cnn_tiny")
    rows = [json.loads(line) for line in open(data / "validation.jsonl")]
    articles = [r[cfg.data.article_field] for r in rows]
    encoder = Encoder(tok, cfg.data)
    prompts = [encoder.encode_prompt(articles[i % len(articles)][:n])
               for i, n in enumerate((4000, 90, 200, 300, 40))]
    assert len({len(p) for p in prompts}) == 5
    return model, tok, prompts


def reference_ids(model, tok, prompts, stop_strings=(), min_new_tokens=0, eos=None, no_repeat_ngram_size=0,
                  repetition_penalty=1.0, classes=None) -> list[list[int]]:
    """`model.generate` on each prompt alone (no padding at all): new ids, padded to NEW. The
    repetition rules run as summ.evaluation hands them to `generate`: over the summary only."""
    rows = []
    for p in prompts:
        ids = torch.tensor([p])
        kwargs = dict(stop_strings=list(stop_strings), tokenizer=tok) if stop_strings else {}
        if no_repeat_ngram_size or repetition_penalty != 1.0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [SummaryOnlyRepetition(len(p), no_repeat_ngram_size, repetition_penalty, classes)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             min_new_tokens=min_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id if eos is None else eos, temperature=None, top_p=None,
                             top_k=None, **kwargs)
        new = out[0, len(p):].tolist()
        rows.append(new + [tok.pad_token_id] * (NEW - len(new)))
    return rows


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_fast_decoder_gives_generates_ids(lora_model, static):
    model, tok, prompts = lora_model
    expected = reference_ids(model, tok, prompts)
    decoder = GreedyDecoder(model, tok, (), CPU, static=static)
    # Batches of 2: two left-padded batches and a last one of 1 (filled up to 2 on the static cache).
    assert decoder.generate(prompts, NEW, batch_size=2) == expected

    # A token the first row writes for the first time (after its first) becomes EOS: that row ends
    # there; then EOS blocked for the first tokens, as generate's min_new_tokens does.
    at = next(k for k in range(1, NEW) if expected[0][k] not in expected[0][:k])
    eos = expected[0][at]
    with_eos = reference_ids(model, tok, prompts, eos=eos)
    assert with_eos[0][:at + 1] == expected[0][:at + 1]
    tok_eos = tok.eos_token_id
    try:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
        decoder = GreedyDecoder(model, tok, (), CPU, static=static)
        assert decoder.generate(prompts, NEW, batch_size=2) == with_eos
        assert decoder.generate(prompts, NEW, batch_size=2, min_new_tokens=4) == \
            reference_ids(model, tok, prompts, min_new_tokens=4, eos=eos)
    finally:
        tok.eos_token = tok.convert_ids_to_tokens(tok_eos)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_repetition_rules_over_the_summary_give_generates_ids(lora_model, static):
    """No repeated n-grams and the repetition penalty inside the decode step: the ids `generate`
    gives with the same rules over the summary, batched and on the static cache."""
    model, tok, prompts = lora_model
    free = reference_ids(model, tok, prompts)
    for n, penalty in ((1, 1.0), (2, 1.0), (3, 1.0), (0, 1.5), (2, 1.3)):
        expected = reference_ids(model, tok, prompts, no_repeat_ngram_size=n, repetition_penalty=penalty)
        assert expected != free  # each rule changes some row
        decoder = GreedyDecoder(model, tok, (), CPU, static=static, no_repeat_ngram_size=n,
                                repetition_penalty=penalty)
        assert decoder.generate(prompts, NEW, batch_size=2) == expected
        if n == 1:
            assert all(len(set(row)) == len(row) for row in expected)
    # Case-insensitive classes (eval.no_repeat_ignore_case) with every fifth token of the vocabulary
    # made one class, so that the tiny model's rows meet a class more than once.
    classes = torch.tensor(token_classes(tok, model.get_output_embeddings().weight.shape[0]))
    classes[::5] = 0
    expected = reference_ids(model, tok, prompts, no_repeat_ngram_size=1, classes=classes)
    assert expected != reference_ids(model, tok, prompts, no_repeat_ngram_size=1)
    decoder = GreedyDecoder(model, tok, (), CPU, static=static, no_repeat_ngram_size=1, ngram_classes=classes)
    assert decoder.generate(prompts, NEW, batch_size=2) == expected


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_stop_strings_give_generates_text(lora_model, static):
    """A stop string completed inside a check window: the decoder runs on up to CHECK_EVERY steps
    more, and the text, stop reason and token count come out as `generate`'s."""
    model, tok, prompts = lora_model
    free = reference_ids(model, tok, prompts)
    # The first new word early in a row that the row has not written before becomes the stop string.
    row, at = next((r, k) for r in range(len(free)) for k in range(1, CHECK_EVERY - 1)
                   if (text := tok.decode(free[r][k:k + 1]).strip()) and text not in tok.decode(free[r][:k]))
    stop = tok.decode(free[row][at:at + 1]).strip()
    expected_ids = reference_ids(model, tok, prompts, stop_strings=(stop,))
    assert expected_ids[row][at + 1:] == [tok.pad_token_id] * (NEW - at - 1)  # generate stopped the row at once
    ids = GreedyDecoder(model, tok, (stop,), CPU, static=static).generate(prompts, NEW, batch_size=2)
    assert NEW > CHECK_EVERY and ids[row][at + 1] != tok.pad_token_id  # ours stopped it at the next check
    assert [finish_generation(row, tok, (stop,)) for row in ids] == \
        [finish_generation(row, tok, (stop,)) for row in expected_ids]


def test_stop_candidates_are_the_tokens_that_can_complete_a_stop_string():
    tok = load_tokenizer(tiny_config("unused"))
    table = stop_candidates(tok, ("\n\n", "###"), 50_304)
    assert table.shape == (50_304,) and table[len(tok):].all()  # ids past the vocabulary: checked by text
    newline, hashes, word = (tok.convert_tokens_to_ids(t) for t in ("Ċ", "###", "Ġcouncil"))
    assert table[newline] and table[hashes] and not table[word]
    assert table[:len(tok)].sum() < len(tok) // 50
    assert stop_candidates(tok, ("\n\n", "###"), 50_304) is table  # built once per tokenizer


def test_batch_size_from_the_memory_budget():
    """Phi-2's KV cache in bf16 is 2 x 32 layers x 2560 x 2 bytes = 320 KiB per position; 576
    positions (512 of prompt, 64 new) make 180 MiB per row, plus prefill activations and logits."""
    from transformers import AutoConfig

    from summ.summaries import rows_that_fit

    phi2 = AutoConfig.from_pretrained(FIXTURES / "phi-2")
    per_row = 2 * 32 * 2560 * 576 * 2 + 4 * 512 * 10240 * 2 + 4 * 51200
    assert rows_that_fit(phi2, 2, 512, 64, 16 * per_row) == 16
    assert rows_that_fit(phi2, 2, 512, 64, 16 * per_row - 1) == 8
    assert rows_that_fit(phi2, 2, 512, 64, 1000 * per_row) == 64  # at most 64
    assert rows_that_fit(phi2, 2, 512, 64, 0) == 1  # never none


@gpu
@pytest.mark.parametrize("compile", ["cudagraphs", "inductor"])
def test_captured_decode_step_applies_the_repetition_rules(tmp_path, compile):
    """The rules inside the decode step that CUDA graphs replay (a length tensor per step, one graph
    for every step): the ids of the same decoder run eagerly, in fp32 on the GPU."""
    from peft import get_peft_model

    cuda = torch.device("cuda")
    cfg = tiny_config(tmp_path)
    tok = load_tokenizer(cfg)
    model = get_peft_model(load_base_model(cfg, cuda, torch.float32), peft_lora_config(cfg, "phi"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.eval()
    rows = [json.loads(line) for line in open(FIXTURES / "xsum_tiny" / "validation.jsonl")]
    encoder = Encoder(tok, cfg.data)
    prompts = [encoder.encode_prompt(r[cfg.data.article_field][:n]) for r, n in zip(rows, (4000, 90, 200, 300))]
    rules = dict(no_repeat_ngram_size=2, repetition_penalty=1.3)
    eager = GreedyDecoder(model, tok, (), cuda, static=True, **rules).generate(prompts, 24, batch_size=2)
    free = GreedyDecoder(model, tok, (), cuda, static=True).generate(prompts, 24, batch_size=2)
    assert eager != free
    assert GreedyDecoder(model, tok, (), cuda, compile=compile, **rules).generate(prompts, 24, batch_size=2) == eager
