import json

import pytest

from summ.config import ConfigError, config_from_dict, load_config

REPO = __import__("pathlib").Path(__file__).parents[1]


def write(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return path


def minimal(**sections):
    raw = {"model": {"name_or_path": "m"}, "data": {"dataset": "d"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("name", ["xsum", "cnn_dailymail", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.json")
    assert cfg.model.trust_remote_code is False


def test_reference_recipe_values():
    cfg = load_config(REPO / "configs" / "xsum.json")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "dense")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.data.max_length) == (1, 8, 512)
    assert cfg.data.train_split == "train[:5000]" and cfg.train.optimizer == "paged_adamw_8bit"
    assert cfg.quant.enabled and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant


@pytest.mark.parametrize("raw, needle", [
    (minimal(train={"lrr": 1}), "unknown key 'train.lrr'"),
    (dict(minimal(), optim={}), "unknown section 'optim'"),
    (minimal(train={"lr": "fast"}), "'train.lr' must be a number"),
    (minimal(train={"micro_batch_size": 1.5}), "'train.micro_batch_size' must be an integer"),
    (minimal(quant={"enabled": 1}), "'quant.enabled' must be true/false"),
    (minimal(train={"lr": 0}), "'train.lr' must be > 0"),
    (minimal(lora={"r": 0}), "'lora.r' must be > 0"),
    (minimal(lora={"dropout": 1.0}), "'lora.dropout' must be in [0, 1)"),
    (minimal(train={"max_steps": 10, "warmup_steps": 11}), "'train.warmup_steps' must be <= train.max_steps"),
    (minimal(data={"template": "Summarize {article}"}), "'data.template' must be"),
    (minimal(data={"template": "{summary} of {article}"}), "'data.template' must be"),
    (minimal(data={"max_length": 8}), "'data.max_length' must be >= 16"),
    (minimal(train={"optimizer": "sgd"}), "'train.optimizer' must be one of"),
    (minimal(lora={"target_modules": []}), "'lora.target_modules' must be a non-empty list"),
    (minimal(model={"name_or_path": ""}), "'model.name_or_path' must be"),
])
def test_config_errors_name_file_and_key(tmp_path, raw, needle):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_config(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: expected a JSON object with sections"):
        load_config(listed)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.json")


def test_overrides_are_typed_by_field(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), ["train.lr=1e-4", "data.max_train_rows=200", "quant.enabled=false",
                                                   "lora.target_modules=q_proj,v_proj", "train.max_steps=null"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.max_train_rows == 200 and cfg.quant.enabled is False
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.train.max_steps is None


@pytest.mark.parametrize("item, needle", [
    ("train.lr", "expected section.key=value"),
    ("train.learning_rate=1", "unknown key 'train.learning_rate'"),
    ("lr=1", "expected section.key"),
    ("train.micro_batch_size=two", "cannot read 'two' as an integer"),
])
def test_override_errors(tmp_path, item, needle):
    with pytest.raises(ConfigError, match=f"--set {item}") as e:
        load_config(write(tmp_path, minimal()), [item])
    assert needle in str(e.value)


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = config_from_dict(minimal(train={"lr": 3e-4}))
    with pytest.raises(Exception):
        cfg.train.lr = 1.0
    cfg.save(tmp_path / "resolved.json")
    assert load_config(tmp_path / "resolved.json") == cfg
