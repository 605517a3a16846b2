import contextlib
import copy
import dataclasses
import json

import pytest
import torch

from summ.config import EvalConfig
from summ.data import Encoder
from summ.evaluation import evaluate_run, template_markers
from summ.summaries import Generation, finish_generation, generate_summaries
from summ.model import load_for_inference, load_tokenizer
from summ.rouge import ROUGE_KEYS, aggregate, score_pairs
from summ.training import train
from tests.conftest import FIXTURES, tiny_config

ARTICLES = [json.loads(line)["document"] for line in open(FIXTURES / "xsum_tiny" / "validation.jsonl")][:3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run of a tiny random Phi-2, with its adapter saved."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    cfg = tiny_config(run, eval={"max_new_tokens": 8, "generate_batch_size": 2, "stop_strings": ["###"],
                                 "bootstrap_resamples": 200})
    train(cfg)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return cfg, run


def test_finish_generation_reports_why_it_stopped():
    tok = load_tokenizer(tiny_config("unused"))
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # Phi-2 has no pad token: its EOS pads
    ids = tok(" Council backs plan.\n### Article: more", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids[4]) == "Ċ"  # the newline is the 5th token
    # Generation stops at the token completing a stop string: the 5 tokens through the newline.
    assert finish_generation(ids, tok, ("\n", "###")) == Generation("Council backs plan.", "stop_string", 5)
    # The EOS counts as generated; what follows it is padding.
    assert finish_generation(ids[:3] + [eos] + ids[3:], tok, ("###",)) == \
        Generation(tok.decode(ids[:3]).strip(), "eos", 4)
    assert finish_generation(ids[:4], tok, ("###",)) == Generation("Council backs plan.", "max_new_tokens", 4)
    # A row stopped by a stop string and padded with the EOS id: the padding is not an EOS it generated.
    assert finish_generation(ids[:5] + [eos] * 3, tok, ("\n",)) == Generation("Council backs plan.", "stop_string", 5)

    tok.pad_token = "!"  # a pad distinct from EOS: trailing padding is dropped from the count
    pad = tok.pad_token_id
    assert finish_generation(ids[:5] + [pad] * 3, tok, ("\n",)) == Generation("Council backs plan.", "stop_string", 5)
    assert finish_generation(ids[:3] + [eos, pad, pad], tok, ()) == Generation("Council backs plan", "eos", 4)


def greedy(model, tok, encoder, articles, **ev):
    return with_ids(model, tok, encoder, articles, **ev)[0]


def with_ids(model, tok, encoder, articles, **ev) -> tuple[list[Generation], list[list[int]]]:
    """generate_summaries in one batch, and the new ids model.generate returned (padding included);
    engine "hf" unless `ev` names one (the fast engine records no ids)."""
    outputs = []
    generate = model.generate

    def recording(**kw):
        out = generate(**kw)
        outputs.append(out[:, kw["input_ids"].shape[1]:].tolist())
        return out

    model.generate = recording
    outputs.append(None)
    try:
        cfg = EvalConfig(generate_batch_size=len(articles), bootstrap_resamples=10, **{"engine": "hf", **ev})
        generations = generate_summaries(model, tok, encoder, articles, cfg, torch.device("cpu"))[0]
    finally:
        model.generate = generate
    return generations, outputs[-1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny random Phi-2 with no adapter, its left-padding tokenizer and encoder."""
    cfg = tiny_config(tmp_path_factory.mktemp("base"))
    tok = load_tokenizer(cfg)
    tok.padding_side = "left"
    return cfg, tok, Encoder(tok, cfg.data), load_for_inference(cfg, torch.device("cpu"), torch.float32)


def retokened(cfg, tok, eos: str | None = None, pad: str | None = None):
    """A copy of `tok` with another EOS and/or pad token, and its encoder."""
    t = copy.deepcopy(tok)
    if eos is not None:
        t.eos_token = eos
    if pad is not None:
        t.pad_token = pad
    return t, Encoder(t, cfg.data)


SHAPES = (slice(None), slice(0, 300), slice(0, 120))  # three prompt lengths: real left padding


def three_articles():
    return [a[s] for a, s in zip(ARTICLES, SHAPES)]


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_left_padded_batches_match_one_by_one_and_stop(base, engine):
    """Both engines against the ids of transformers' `generate`: the fast engine gives the same text,
    stop reasons and token counts."""
    cfg, tok, encoder, model = base
    articles = three_articles()
    free, ids = with_ids(model, tok, encoder, articles, max_new_tokens=8, stop_strings=())
    assert free == greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=(), engine=engine)
    alone = [greedy(model, tok, encoder, [a], max_new_tokens=8, stop_strings=(), engine=engine)[0]
             for a in articles]
    assert free == alone
    assert [(g.stop_reason, g.new_tokens) for g in free] == [("max_new_tokens", 8)] * 3
    assert [g.text for g in free] == [tok.decode(row).strip() for row in ids]

    # The first row's third token becomes a stop string that the other rows never produce.
    stop_text = tok.decode(ids[0][2:3]).strip()
    assert stop_text and stop_text not in tok.decode(ids[0][:2]) and all(stop_text not in g.text for g in free[1:])
    stopped = greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=(stop_text,), engine=engine)
    assert stopped == [Generation(tok.decode(ids[0][:2]).strip(), "stop_string", 3), free[1], free[2]]

    # The first row's fourth token becomes EOS (Phi-2's EOS stays the pad): that row ends there, the
    # others run on unchanged.
    assert all(ids[0][3] not in row for row in ids[1:])
    eos_tok, eos_encoder = retokened(cfg, tok, eos=tok.convert_ids_to_tokens(ids[0][3]))
    ended = greedy(model, eos_tok, eos_encoder, articles, max_new_tokens=8, stop_strings=(), engine=engine)
    assert ended == [Generation(tok.decode(ids[0][:3]).strip(), "eos", 4), free[1], free[2]]


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_new_tokens_count_only_what_each_row_generated(base, engine):
    """A row that ends early is padded up to the batch's length; the padding is not generated tokens,
    whether the pad id is a token of its own or the EOS (as for Phi-2). The other two cases (a stop
    string padded with the EOS id, an EOS padded with another id) are in the test above."""
    cfg, tok, encoder, model = base
    articles = three_articles()
    free, ids = with_ids(model, tok, encoder, articles, max_new_tokens=8, stop_strings=())
    stop_text, eos_token = tok.decode(ids[0][2:3]).strip(), tok.convert_ids_to_tokens(ids[0][3])
    for t, stop_strings, expected in ((retokened(cfg, tok, pad="!"), (stop_text,), 3),
                                      (retokened(cfg, tok, eos=eos_token, pad=eos_token), (), 4)):
        assert t[0].pad_token_id == (t[0].convert_tokens_to_ids("!") if stop_strings else t[0].eos_token_id)
        ev = EvalConfig(generate_batch_size=3, max_new_tokens=8, stop_strings=stop_strings, bootstrap_resamples=10,
                        engine=engine)
        generations, speed = generate_summaries(model, *t, articles, ev, torch.device("cpu"))
        assert [g.new_tokens for g in generations] == [expected, 8, 8]
        assert generations[1:] == free[1:]
        assert speed["generated_tokens"] == expected + 16


def test_beam_search_batches_match_one_by_one(base):
    cfg, tok, encoder, model = base
    articles = three_articles()
    beams, ids = with_ids(model, tok, encoder, articles, max_new_tokens=8, stop_strings=(), num_beams=3)
    alone = [greedy(model, tok, encoder, [a], max_new_tokens=8, stop_strings=(), num_beams=3)[0] for a in articles]
    assert beams == alone
    assert [(g.stop_reason, g.new_tokens) for g in beams] == [("max_new_tokens", 8)] * 3
    assert beams[0].text != greedy(model, tok, encoder, articles[:1], max_new_tokens=8, stop_strings=())[0].text

    # One row's beams end on EOS and are padded; the others run on: batched still equals one-by-one.
    # The EOS is a token of the first row's best beam that the other rows never write and that beam
    # search, scoring finished beams by length, then picks as the end (the first such position).
    for k in range(1, 8):
        if any(ids[0][k] in row for row in ids[1:]):
            continue
        eos_tok, eos_encoder = retokened(cfg, tok, eos=tok.convert_ids_to_tokens(ids[0][k]))
        first = greedy(model, eos_tok, eos_encoder, articles[:1], max_new_tokens=8, stop_strings=(), num_beams=3)
        if first[0].stop_reason == "eos":
            break
    assert first[0].stop_reason == "eos" and first[0].new_tokens < 8
    ended = greedy(model, eos_tok, eos_encoder, articles, max_new_tokens=8, stop_strings=(), num_beams=3)
    assert ended == first + beams[1:]


def test_beam_search_without_repeated_trigrams_batches_match_one_by_one(base):
    """BART's decoding (beams + no repeated trigram) on left-padded batches: each row's banned n-grams
    are its own, so the batch gives each article the summary it gets alone."""
    cfg, tok, encoder, model = base
    articles = three_articles()
    settings = dict(max_new_tokens=48, stop_strings=(), num_beams=3, no_repeat_ngram_size=3, length_penalty=2.0)
    batched = greedy(model, tok, encoder, articles, **settings)
    alone = [greedy(model, tok, encoder, [a], **settings)[0] for a in articles]
    assert batched == alone
    free = greedy(model, tok, encoder, articles, max_new_tokens=48, stop_strings=(), num_beams=3)
    assert [g.text for g in batched] != [g.text for g in free]  # the ban changed something


@contextlib.contextmanager
def copying(model, token_ids, boost: float = 30.0):
    """The model made to prefer `token_ids` (its prompts' tokens) at every step, as a summarizer
    prefers its article's words: a bias on the output layer's logits, seen by both engines."""
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[sorted(token_ids)] = boost
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        yield
    finally:
        handle.remove()


def test_engines_agree_on_the_repetition_rules_batched_and_alone(base):
    """Greedy with no repeated bigrams and a repetition penalty: the fast engine (the rules inside its
    decode step) gives `generate`'s text (the rules as a logits processor), batched as alone."""
    _, tok, encoder, model = base
    articles = three_articles()
    settings = dict(max_new_tokens=24, stop_strings=(), no_repeat_ngram_size=2, repetition_penalty=1.2)
    with copying(model, {t for a in articles for t in encoder.encode_prompt(a)}):
        hf = greedy(model, tok, encoder, articles, **settings)
        assert hf == greedy(model, tok, encoder, articles, engine="fast", **settings)
        assert hf == [greedy(model, tok, encoder, [a], engine="fast", **settings)[0] for a in articles]
        assert hf != greedy(model, tok, encoder, articles, max_new_tokens=24, stop_strings=())


def test_the_summary_may_copy_the_article_but_not_itself(base):
    """No repeated unigrams over the summary: a copying model still copies its article's tokens, each
    once. transformers' rule over prompt + summary (repetition_scope "sequence") bans them all."""
    _, tok, encoder, model = base
    article = ARTICLES[0]
    prompt = set(encoder.encode_prompt(article))
    with copying(model, prompt):
        _, [free] = with_ids(model, tok, encoder, [article], max_new_tokens=16, stop_strings=())
        assert set(free) <= prompt and len(set(free)) < len(free)  # copies, and repeats itself

        texts, [summary] = with_ids(model, tok, encoder, [article], max_new_tokens=16, stop_strings=(),
                                    no_repeat_ngram_size=1)
        assert set(summary) <= prompt and len(set(summary)) == len(summary) == 16
        assert texts == greedy(model, tok, encoder, [article], max_new_tokens=16, stop_strings=(),
                               no_repeat_ngram_size=1, engine="fast")

        _, [sequence] = with_ids(model, tok, encoder, [article], max_new_tokens=16, stop_strings=(),
                                 no_repeat_ngram_size=1, repetition_scope="sequence", engine="fast")
        assert not set(sequence) & prompt


def test_no_repeat_ngram_size_reaches_generation(base):
    _, tok, encoder, model = base

    def repeats(new_ids):
        return any(len(set(row)) < len(row) for row in new_ids)

    _, ids = with_ids(model, tok, encoder, ARTICLES, max_new_tokens=32, stop_strings=())
    assert repeats(ids)  # the random model repeats tokens when left alone...
    _, ids = with_ids(model, tok, encoder, ARTICLES, max_new_tokens=32, stop_strings=(), no_repeat_ngram_size=1)
    assert not repeats(ids)  # ...and never once the guard is on


def test_template_markers_come_from_the_prompt():
    cfg = tiny_config("unused")
    assert template_markers(cfg.data.template, ("###",)) == ("###", "### Article:", "### Instruction:",
                                                             "### Summary:")
    assert template_markers("Summarize: {article}\n\nSummary: {summary}", ()) == ("Summarize:", "Summary:")


def test_evaluate_writes_predictions_report_and_gain(tiny_run):
    cfg, run = tiny_run
    base = evaluate_run(cfg, run, zero_shot=True)
    tuned = evaluate_run(cfg, run)
    for folder, m in ((run / "zero_shot", base), (run / "eval", tuned)):
        preds = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        errors = [json.loads(x) for x in (folder / "errors.jsonl").read_text().splitlines()]
        assert len(preds) == len(errors) == m["generated_rows"] == 6
        assert [p["id"] for p in preds] == [e["id"] for e in errors]
        assert all(set(p) == {"id", "reference", "prediction", "stop_reason", "new_tokens", *ROUGE_KEYS}
                   for p in preds)
        assert m["stop_reasons"] == {k: sum(p["stop_reason"] == k for p in preds)
                                     for k in ("eos", "stop_string", "max_new_tokens")}
        assert m["generation"]["generated_tokens"] == sum(p["new_tokens"] for p in preds)
        assert all(1 <= p["new_tokens"] <= 8 for p in preds)
        assert json.loads((folder / "eval_metrics.json").read_text()) == json.loads(json.dumps(m))
        # Per-example scores are those of the prediction written, and the reported intervals the
        # seeded bootstrap of exactly those scores.
        assert [{k: p[k] for k in ROUGE_KEYS} for p in preds] == \
            score_pairs([p["prediction"] for p in preds], [p["reference"] for p in preds])
        assert m["rouge"] == aggregate([{k: p[k] for k in ROUGE_KEYS} for p in preds], n_resamples=200,
                                       seed=cfg.train.seed)
    # The adapter was applied: the run's own final validation loss, not the base model's.
    trained = json.loads((run / "metrics.json").read_text())["final_val_loss"]
    assert tuned["val_loss"] == pytest.approx(trained, abs=1e-5)
    assert abs(base["val_loss"] - trained) > 5e-4  # 3 steps move the loss by ~1.3e-3 (deterministic)
    report = (run / "eval" / "eval_report.md").read_text()
    assert "## Gain from fine-tuning" in report
    assert "hit max_new_tokens=8 without stopping" in report
    assert "worst examples by ROUGE-Lsum" in report


def test_every_loss_says_what_it_is_and_the_eval_loss_is_trainings_last_validation_in_bf16(tmp_path):
    """In bf16 the evaluation's validation loss is training's last one to the last digit (the adapter beside
    the weights, under training's autocast; merging it first rounded the loss off in the 4th decimal);
    metrics.json names the last step's train loss and the last validation's step and rows; log.jsonl's
    train/loss is the mean over log.log_every steps."""
    from accelerate.state import AcceleratorState, GradientState

    run = tmp_path / "bf16"
    cfg = tiny_config(run, train={"mixed_precision": "bf16", "max_steps": 3},
                      eval={"max_new_tokens": 4, "generate_rows": 2, "bootstrap_resamples": 10},
                      log={"log_every": 2})
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, compute_dtype="bfloat16"))
    assert cfg.eval.merge_adapter
    result = train(cfg)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m = evaluate_run(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert m["val_loss"] == metrics["final_val_loss"]
    assert m["generation"]["adapter_merged"] is True  # generation still runs on the merged weights
    assert "final_train_loss" not in metrics
    assert metrics["last_step_train_loss"] == result.train_losses[-1]
    assert (metrics["final_val_step"], metrics["final_val_rows"], m["loss_rows"]) == (3, 6, 6)
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [2, 3]
    assert logged[-2]["train/loss"] == pytest.approx(sum(result.train_losses[-2:]) / 2, rel=1e-12)
    report = (run / "eval" / "eval_report.md").read_text().splitlines()
    assert f"| validation loss (mean per summary + EOS token, 6 `validation` rows) | {m['val_loss']:.4f} |" in report


def test_rouge_intervals_are_seeded_bootstraps_around_the_mean():
    """The interval evaluate_run reports, on scores spread enough to have one (a random tiny model
    scores a constant 0)."""
    spread = [0.0, 12.5, 20.0, 31.0, 44.4, 50.0, 61.0, 75.0]
    rows = [{"rouge1": v, "rouge2": v / 2, "rougeL": 30.0, "rougeLsum": v} for v in spread]
    result = aggregate(rows, n_resamples=500, seed=3)
    r = result["rouge1"]
    assert r["mean"] == pytest.approx(sum(spread) / len(spread), abs=1e-12)
    assert min(spread) < r["low"] < r["mean"] < r["high"] < max(spread)
    assert result["rougeLsum"] == r  # the same scores, the same seed: the same interval
    assert result["rouge2"] == pytest.approx({k: v / 2 for k, v in r.items()})  # it scales with the scores
    assert result["rougeL"] == {"mean": 30.0, "low": 30.0, "high": 30.0}  # identical scores: no spread
    assert aggregate(rows, n_resamples=500, seed=3) == result  # deterministic for a seed
    assert aggregate(rows, n_resamples=500, seed=4)["rouge1"] != r  # and the seed is used
    more = aggregate(rows * 16, n_resamples=500, seed=3)["rouge1"]  # the same scores, 16 times as many
    assert more["mean"] == pytest.approx(r["mean"], abs=1e-12)
    assert r["low"] < more["low"] < more["mean"] < more["high"] < r["high"]
    assert more["high"] - more["low"] < (r["high"] - r["low"]) / 2  # ~1/sqrt(16) as wide


def test_merged_adapter_evaluates_like_the_separate_one(tiny_run, tmp_path):
    """eval.merge_adapter folds LoRA into the loaded copy: same loss and same greedy summaries; the
    saved adapter stays a separate PEFT adapter."""
    import dataclasses

    cfg, run = tiny_run
    adapter_before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    results = {}
    for merge in (False, True):
        cfg_m = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, merge_adapter=merge))
        metrics = evaluate_run(cfg_m, run)
        preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
        results[merge] = (metrics, [(p["prediction"], p["stop_reason"], p["new_tokens"]) for p in preds])
    assert results[True][0]["generation"]["adapter_merged"] is True
    assert results[False][0]["generation"]["adapter_merged"] is False
    assert results[True][1] == results[False][1] and len(results[True][1]) == 6
    assert results[True][0]["val_loss"] == pytest.approx(results[False][0]["val_loss"], rel=0, abs=1e-6)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
    merged = load_for_inference(cfg, torch.device("cpu"), torch.float32, run / "adapter", merge=True)
    separate = load_for_inference(cfg, torch.device("cpu"), torch.float32, run / "adapter", merge=False)
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    assert len([n for n, _ in separate.named_modules() if n.endswith("lora_A")]) == 8


def test_evaluate_under_a_name_keeps_the_default_folder(tiny_run):
    cfg, run = tiny_run
    default = run / "eval" / "eval_metrics.json"
    before = default.read_text() if default.exists() else None
    named = evaluate_run(cfg, run, name="greedy-again")
    assert (default.read_text() if default.exists() else None) == before
    assert json.loads((run / "greedy-again" / "eval_metrics.json").read_text()) == json.loads(json.dumps(named))
    assert len((run / "greedy-again" / "predictions.jsonl").read_text().splitlines()) == 6
