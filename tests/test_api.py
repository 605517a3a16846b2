"""The Python API of summ/api.py, as a notebook uses it: load a config, train, evaluate, summarize."""

import importlib
import json

import pytest

import summ
from summ.config import ConfigError
from summ.data import DataError
from tests.conftest import FIXTURES, tiny_config

ARTICLES = [json.loads(line)["document"] for line in open(FIXTURES / "xsum_tiny" / "validation.jsonl")][:2]


def test_load_train_evaluate_summarize(tmp_path):
    raw = tiny_config(tmp_path / "unused").to_dict()
    cfg = summ.load_config(raw, {"train.max_steps": 2, "log.output_dir": str(tmp_path / "run"),
                                 "eval.generate_rows": 2, "eval.max_new_tokens": 8, "eval.bootstrap_resamples": 10})
    assert (cfg.train.max_steps, cfg.eval.generate_rows) == (2, 2)
    assert summ.load_config(raw, ["train.max_steps=2"]).train.max_steps == 2

    run = summ.train(cfg)
    assert run == tmp_path / "run" and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "| ROUGE | not evaluated yet" in (run / "adapter" / "README.md").read_text()
    metrics = summ.evaluate(run)
    assert (metrics["generated_rows"], metrics["zero_shot"]) == (2, False)
    rouge1 = metrics["rouge"]["rouge1"]["mean"]
    assert f"| ROUGE-1 / 2 / Lsum | {rouge1:.2f} / " in (run / "adapter" / "README.md").read_text()

    # The evaluation summarized the same two validation articles.
    expected = [json.loads(line)["prediction"] for line in (run / "eval" / "predictions.jsonl").open()]
    assert summ.summarize(run, ARTICLES) == expected
    assert summ.summarize(run, "  " + ARTICLES[0] + "\n") == expected[0]
    # The API stays the API once the loop's own modules are loaded.
    importlib.import_module("summ.evaluation"), importlib.import_module("summ.training")
    assert summ.train.__module__ == summ.evaluate.__module__ == "summ.api"


def test_api_errors_are_one_line_and_name_the_input(tmp_path):
    with pytest.raises(ConfigError) as e:
        summ.load_config(tmp_path / "missing.json")
    assert str(e.value) == f"{tmp_path / 'missing.json'}: config file not found (looked for {tmp_path / 'missing.json'})"
    with pytest.raises(ConfigError) as e:
        summ.load_config({}, {"lr": 1e-3})
    assert str(e.value) == "overrides: 'lr': expected 'section.key'"
    with pytest.raises(ConfigError) as e:
        summ.summarize(tmp_path, "An article.")
    assert str(e.value) == f"{tmp_path}: not a run folder (no config.json); pass the log.output_dir of a training run"
    with pytest.raises(DataError) as e:
        summ.summarize(tmp_path, [])
    assert str(e.value) == "articles: expected a non-empty string or a non-empty list of non-empty strings"
    with pytest.raises(ConfigError) as e:
        summ.train({"model": {}})
    assert str(e.value) == "expected a RunConfig from summ.load_config, got dict"
