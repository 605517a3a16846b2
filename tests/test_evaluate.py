import json
import sys
from pathlib import Path

import pytest
import torch

from summ.config import EvalConfig
from summ.data import Encoder
from summ.evaluate import evaluate_run, finish_generation, generate_summaries, template_markers
from summ.model import load_for_inference, load_tokenizer
from summ.train import train
from tests.conftest import FIXTURES, tiny_config

REPO = Path(__file__).parents[1]
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
    ids = tok(" Council backs plan.\n### Article: more", add_special_tokens=False).input_ids
    g = finish_generation(ids, tok, ("\n", "###"))
    assert (g.text, g.stop_reason) == ("Council backs plan.", "stop_string")
    g = finish_generation(ids[:3] + [tok.eos_token_id] + ids[3:], tok, ("###",))
    assert g.stop_reason == "eos" and g.new_tokens == 3 and g.text == tok.decode(ids[:3]).strip()
    g = finish_generation(ids[:4], tok, ("###",))
    assert g.stop_reason == "max_new_tokens" and g.new_tokens == 4


def greedy(model, tok, encoder, articles, **ev):
    cfg = EvalConfig(generate_batch_size=len(articles), bootstrap_resamples=10, **ev)
    return generate_summaries(model, tok, encoder, articles, cfg, torch.device("cpu"))[0]


def base_for_generation(tmp_path):
    """The tiny random Phi-2 with no adapter, its left-padding tokenizer and encoder."""
    cfg = tiny_config(tmp_path)
    tok = load_tokenizer(cfg)
    tok.padding_side = "left"
    return cfg, tok, Encoder(tok, cfg.data), load_for_inference(cfg, torch.device("cpu"), torch.float32)


def test_left_padded_batches_match_one_by_one_and_stop(tmp_path):
    cfg, tok, encoder, model = base_for_generation(tmp_path)
    articles = [ARTICLES[0], ARTICLES[1][:300], ARTICLES[2][:120]]  # three prompt lengths: real left padding
    free = greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=())
    alone = [greedy(model, tok, encoder, [a], max_new_tokens=8, stop_strings=())[0] for a in articles]
    assert [g.text for g in free] == [g.text for g in alone]
    assert all(g.stop_reason == "max_new_tokens" and g.new_tokens == 8 for g in free)

    # Make a token the first row generates its stop string, then its EOS: each row stops on its own.
    first_ids = tok(free[0].text, add_special_tokens=False).input_ids
    stop_text = tok.decode(first_ids[2:3]).strip()
    assert stop_text
    stopped = greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=(stop_text,))
    assert stopped[0].stop_reason == "stop_string" and stop_text not in stopped[0].text
    assert stopped[0].new_tokens < 8
    for g, f in zip(stopped[1:], free[1:]):  # rows that never produce it run on unchanged
        assert g.text == f.text or g.stop_reason == "stop_string"

    eos_tok = load_tokenizer(cfg)
    eos_tok.padding_side = "left"
    eos_tok.eos_token = tok.convert_ids_to_tokens(first_ids[3])
    ended = greedy(model, eos_tok, Encoder(eos_tok, cfg.data), articles[:1], max_new_tokens=8, stop_strings=())
    assert ended[0].stop_reason == "eos" and ended[0].new_tokens <= 3


def test_no_repeat_ngram_size_reaches_generation(tmp_path):
    _, tok, encoder, model = base_for_generation(tmp_path)
    outputs = []
    generate = model.generate
    model.generate = lambda **kw: outputs.append(generate(**kw)[:, kw["input_ids"].shape[1]:]) or \
        torch.cat([kw["input_ids"], outputs[-1]], dim=1)

    def repeats(new_ids):
        return any(len(set(row.tolist())) < len(row) for row in new_ids)

    greedy(model, tok, encoder, ARTICLES, max_new_tokens=32, stop_strings=())
    assert repeats(outputs[-1])  # the random model repeats tokens when left alone...
    greedy(model, tok, encoder, ARTICLES, max_new_tokens=32, stop_strings=(), no_repeat_ngram_size=1)
    assert not repeats(outputs[-1])  # ...and never once the guard is on


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
        assert {"id", "reference", "prediction", "stop_reason", "rouge1", "rougeLsum"} <= set(preds[0])
        assert sum(m["stop_reasons"].values()) == 6
        assert json.loads((folder / "eval_metrics.json").read_text())["val_loss"] == m["val_loss"]
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            r = m["rouge"][key]
            assert r["low"] <= r["mean"] <= r["high"]
        assert m["generation"]["generated_tokens_per_s"] > 0
    assert base["val_loss"] != tuned["val_loss"]  # the adapter was applied
    report = (run / "eval" / "eval_report.md").read_text()
    assert "## Gain from fine-tuning" in report and "hit max_new_tokens=8 without stopping" in report
    assert "worst examples by ROUGE-Lsum" in report and "ROUGE-Lsum" in report


def test_predict_and_merge_from_the_cli(tiny_run, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import run as cli

    cfg, run = tiny_run
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": f"a{i}", "article": a}) + "\n" for i, a in enumerate(ARTICLES)))
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", "--run", str(run), "--jsonl", str(articles), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a0", "a1", "a2"] and all("summary" in x for x in lines)

    text = tmp_path / "article.txt"
    text.write_text(ARTICLES[0])
    assert cli.main(["predict", "--run", str(run), "--text-file", str(text)]) == 0
    assert capsys.readouterr().out.strip() == lines[0]["summary"]

    merged = tmp_path / "merged"
    assert cli.main(["predict", "--run", str(run), "--merge", str(merged)]) == 0
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert (merged / "model.safetensors").is_file()
    with_adapter = load_for_inference(cfg, torch.device("cpu"), torch.float32, run / "adapter")
    ids = torch.tensor([[464, 3797, 3332, 319, 262, 2603]])
    torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)


def test_malformed_prediction_input_names_the_row(tiny_run, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import run as cli

    _, run = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"article": "fine"}) + "\n{broken\n")
    assert cli.main(["predict", "--run", str(run), "--jsonl", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"article": "fine"}) + "\n" + json.dumps({"text": "wrong key"}) + "\n")
    assert cli.main(["predict", "--run", str(run), "--jsonl", str(bad)]) == 2
    assert f"{bad}:2: expected an object with a non-empty string 'article'" in capsys.readouterr().err


def test_static_kv_cache_generates_what_the_dynamic_one_does(tmp_path):
    cfg, tok, encoder, model = base_for_generation(tmp_path)
    articles = [ARTICLES[0], ARTICLES[1][:300], ARTICLES[2][:120]]
    dynamic = greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=())
    static = greedy(model, tok, encoder, articles, max_new_tokens=8, stop_strings=(), cache_implementation="static")
    assert [g.text for g in static] == [g.text for g in dynamic]
    assert all(g.new_tokens == 8 for g in static)
