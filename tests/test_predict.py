"""`run.py predict`: summaries from the command line, merging the adapter into a plain model, and
every option mistake caught before a model loads."""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from summ.predict import MISSING_ADAPTER_HINT, base_dtype, summarize
from summ.sources import random_folder
from summ.training import train
from tests.conftest import FIXTURES, tiny_config

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO))
import run as cli  # noqa: E402

ARTICLES = [json.loads(line)["document"] for line in open(FIXTURES / "xsum_tiny" / "validation.jsonl")][:3]


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    """A 4-step 4-bit run of a tiny random Phi-2. The large learning rate moves the adapter far enough that the merged model's outputs differ from the base's."""
    run = tmp_path_factory.mktemp("run") / "quant"
    cfg = tiny_config(run, quant=True, train={"max_steps": 4, "lr": 3e-2},
                      eval={"generate": False, "max_new_tokens": 8, "generate_batch_size": 2, "stop_strings": ["###"]})
    train(cfg)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return cfg, run


@pytest.fixture
def no_model_loads(monkeypatch):
    """Makes loading a model a test failure: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("summ.model.load_base_model", refuse)


def error_of(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    return err.removeprefix("error: ").rstrip("\n")


def prompt_ids(cfg) -> torch.Tensor:
    from summ.data import Encoder
    from summ.model import load_tokenizer

    return torch.tensor([Encoder(load_tokenizer(cfg), cfg.data).encode_prompt(ARTICLES[0])])


def greedy_ids(model, ids: torch.Tensor) -> list[int]:
    # stop_strings: the merged folder's generation config holds the run's, which need a tokenizer.
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=50256, temperature=None, top_p=None, top_k=None, stop_strings=None)
    return out[0, ids.shape[1]:].tolist()


def safetensors_dtypes(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}


def test_merge_writes_the_whole_model_in_the_base_dtype(quant_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run = quant_run
    merged = tmp_path / "merged"
    assert cli.main(["predict", "--run", str(run), "--merge", str(merged)]) == 0
    # Random weights have no published dtype of their own: float32.
    assert capsys.readouterr().out == f"merged model written to {merged} (float32)\n"

    base_folder = random_folder(cfg.model, dtype=torch.float32, seed=cfg.train.seed)
    base_keys = set(safetensors_dtypes(Path(base_folder)))
    written = safetensors_dtypes(merged)
    assert set(written) == base_keys
    assert set(written.values()) == {"F32"}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"

    plain, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")} == \
        {"missing_keys": [], "unexpected_keys": []}
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    ids = prompt_ids(cfg)
    with torch.no_grad():
        base_logits_before = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        assert greedy_ids(plain.eval(), ids) == greedy_ids(with_adapter, ids)
        merged_logits = plain(ids).logits
        torch.testing.assert_close(merged_logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    # The adapter was merged, not dropped: the outputs moved away from the base model's.
    assert (merged_logits - base_logits_before).abs().max() > 1e-2


def test_merge_refuses_a_non_empty_folder_unless_forced(quant_run, tmp_path, capsys, monkeypatch):
    _, run = quant_run
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with monkeypatch.context() as m:
        m.setattr("summ.model.load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
        assert error_of(["predict", "--run", str(run), "--merge", str(target)], capsys) == \
            f"--merge {target}: folder exists and is not empty; pass --force to replace it"
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    assert cli.main(["predict", "--run", str(run), "--merge", str(target), "--force", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out == f"merged model written to {target} (bfloat16)\n"
    assert not (target / "notes.txt").exists()
    assert set(safetensors_dtypes(target).values()) == {"BF16"}
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["predict", "--run", str(run), "--merge", str(empty), "--dtype", "float16"]) == 0
    assert capsys.readouterr().out == f"merged model written to {empty} (float16)\n"
    assert set(safetensors_dtypes(empty).values()) == {"F16"}


def test_merge_never_replaces_the_run_or_a_file(quant_run, tmp_path, capsys, no_model_loads):
    _, run = quant_run
    assert error_of(["predict", "--run", str(run), "--merge", str(run.parent), "--force"], capsys) == \
        f"--merge {run.parent}: would replace the run folder {run} that holds the adapter"
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    assert error_of(["predict", "--run", str(run), "--merge", str(a_file), "--force"], capsys) == \
        f"--merge {a_file}: exists and is not a folder"
    assert error_of(["predict", "--run", str(run), "--dtype", "float16"], capsys) == \
        "--dtype: only applies with --merge OUT"


def test_base_dtype_comes_from_the_model_config(tmp_path):
    def pretrained(folder):
        return tiny_config(tmp_path, model={"name_or_path": str(folder), "init": "pretrained"})

    assert base_dtype(pretrained(FIXTURES / "phi-2")) == torch.float16  # "torch_dtype": "float16"
    assert base_dtype(pretrained(FIXTURES / "tinyllama")) == torch.float32  # "dtype": "float32"
    silent = tmp_path / "silent"
    silent.mkdir()
    raw = json.loads((FIXTURES / "phi-2" / "config.json").read_text())
    del raw["torch_dtype"]
    (silent / "config.json").write_text(json.dumps(raw))
    assert base_dtype(pretrained(silent)) == torch.float32
    raw["dtype"] = "bfloat16"
    (silent / "config.json").write_text(json.dumps(raw))
    assert base_dtype(pretrained(silent)) == torch.bfloat16
    assert base_dtype(tiny_config(tmp_path)) == torch.float32  # random weights


def test_predict_from_the_cli(quant_run, tmp_path, capsys):
    cfg, run = quant_run
    expected = summarize(cfg, run, ARTICLES)
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": f"a{i}", "article": a}) + "\n" for i, a in enumerate(ARTICLES)))
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", "--run", str(run), "--jsonl", str(articles), "--out", str(out)]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == \
        [{"id": f"a{i}", "summary": g.text, "stop_reason": g.stop_reason} for i, g in enumerate(expected)]

    text = tmp_path / "article.txt"
    text.write_text(ARTICLES[0])
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(run), "--text-file", str(text)]) == 0
    assert capsys.readouterr().out == expected[0].text + "\n"


def test_out_into_a_missing_folder_fails_before_loading(quant_run, tmp_path, capsys, no_model_loads):
    _, run = quant_run
    text = tmp_path / "article.txt"
    text.write_text(ARTICLES[0])
    out = tmp_path / "missing" / "out.jsonl"
    assert error_of(["predict", "--run", str(run), "--text-file", str(text), "--out", str(out)], capsys) == \
        f"--out {out}: folder {out.parent} does not exist"
    assert error_of(["predict", "--run", str(run), "--text-file", str(text), "--out", str(tmp_path)], capsys) == \
        f"--out {tmp_path}: is a folder; expected a file path"
    assert not out.parent.exists()


def test_malformed_prediction_input_names_the_row(quant_run, tmp_path, capsys, no_model_loads):
    _, run = quant_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"article": "fine"}) + "\n{broken\n")
    assert error_of(["predict", "--run", str(run), "--jsonl", str(bad)], capsys).startswith(
        f"{bad}:2: not valid JSON")
    bad.write_text(json.dumps({"article": "fine"}) + "\n" + json.dumps({"text": "wrong key"}) + "\n")
    assert error_of(["predict", "--run", str(run), "--jsonl", str(bad)], capsys) == \
        f"{bad}:2: expected an object with a non-empty string 'article'"
    # Before a merge too: a bad input file costs no merge.
    merged = tmp_path / "merged"
    assert error_of(["predict", "--run", str(run), "--jsonl", str(bad), "--merge", str(merged)], capsys) == \
        f"{bad}:2: expected an object with a non-empty string 'article'"
    assert not merged.exists()


def run_with_config(tmp_path, run, name="copied_run", **model) -> Path:
    """A copy of the run's config.json (and adapter) with `model` changes."""
    copy = tmp_path / name
    copy.mkdir()
    raw = json.loads((run / "config.json").read_text())
    raw["model"].update(model)
    (copy / "config.json").write_text(json.dumps(raw))
    if (run / "adapter").is_dir():
        shutil.copytree(run / "adapter", copy / "adapter")
    return copy


def test_trust_remote_code_needs_the_flag(quant_run, tmp_path, capsys, no_model_loads):
    _, run = quant_run
    trusting = run_with_config(tmp_path, run, trust_remote_code=True)
    config = trusting / "config.json"
    for argv in (["eval", "--run", str(trusting)], ["eval", "--run", str(trusting), "--zero-shot"],
                 ["predict", "--run", str(trusting), "--merge", str(tmp_path / "m")]):
        assert error_of(argv, capsys) == (f"{config}: model.trust_remote_code is true, which runs code from the "
                                          f"model's repository; pass --trust-remote-code to allow it")
    assert error_of(["eval", "--run", str(run), "--set", "model.trust_remote_code=true"], capsys).startswith(
        "--set model.trust_remote_code=true: model.trust_remote_code is true")
    assert not (tmp_path / "m").exists() and not (trusting / "eval").exists()
    for command in ("eval", "predict"):
        args = cli.parse([command, "--run", str(trusting), "--trust-remote-code"])
        assert cli.run_config(args).model.trust_remote_code is True


def options_of(command: str, capsys) -> set[str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    flags = {m.group(1) for m in re.finditer(r"^  (?:-\w, )?(--[a-z][a-z-]*)", help_text, re.MULTILINE)}
    assert {"--help", "--set"} <= flags  # the listing was read at all
    return flags


def test_every_hint_names_an_option_of_its_command(quant_run, tmp_path, capsys, no_model_loads):
    _, run = quant_run
    untrained = run_with_config(tmp_path, run, "untrained")
    shutil.rmtree(untrained / "adapter")
    trusting = run_with_config(tmp_path, run, "trusting", trust_remote_code=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    messages = {
        "eval": [error_of(["eval", "--run", str(untrained)], capsys),
                 error_of(["eval"], capsys),
                 error_of(["eval", "--run", str(trusting)], capsys)],
        "predict": [error_of(["predict", "--run", str(untrained)], capsys),
                    error_of(["predict", "--run", str(trusting)], capsys),
                    error_of(["predict", "--run", str(run), "--merge", str(tmp_path / "full")], capsys),
                    error_of(["predict", "--run", str(run), "--force"], capsys),
                    error_of(["predict", "--run", str(run), "--out", str(tmp_path / "no" / "o.jsonl")], capsys)],
    }
    # Messages from the library itself, without run.py's early checks in front.
    with pytest.raises(FileNotFoundError) as e:
        summarize(tiny_config(tmp_path), untrained, ARTICLES[:1])
    assert str(e.value) == f"{untrained / 'adapter'}: no trained adapter ({MISSING_ADAPTER_HINT})"
    messages["predict"].append(str(e.value))

    assert messages["eval"][0] == (f"{untrained / 'adapter'}: no trained adapter "
                                   f"(train first, or pass --zero-shot to score the base model)")
    assert messages["predict"][0] == f"{untrained / 'adapter'}: no trained adapter ({MISSING_ADAPTER_HINT})"
    for command, texts in messages.items():
        named = {flag for text in texts for flag in re.findall(r"--[a-z][a-z-]*", text)}
        assert named and named <= options_of(command, capsys), (command, named)


def test_eval_name_must_be_a_new_folder_of_the_run(quant_run, capsys, no_model_loads):
    _, run = quant_run
    expected = "expected a new folder name inside the run (not adapter, checkpoints, eval, lead, tensorboard, " \
               "zero_shot, no '/'), and no --baseline"
    for name in ("adapter", "eval", "a/b", "..", ""):
        assert error_of(["eval", "--run", str(run), "--name", name], capsys) == f"--name {name!r}: {expected}"
    assert error_of(["eval", "--run", str(run), "--baseline", "lead", "--name", "beams"], capsys) == \
        f"--name 'beams': {expected}"
    assert not (run / "beams").exists()


def test_dequantized_merged_4bit_model_computes_what_the_4bit_model_with_its_adapter_does(quant_run):
    """eval.dequantize_for_generation: the 4-bit weights dequantized, the adapter merged into them;
    the outputs stay the trained (4-bit + adapter) model's, on plain linears."""
    import bitsandbytes as bnb

    from summ.model import load_for_inference

    cfg, run = quant_run
    fast_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, dequantize_for_generation=True))
    four_bit = load_for_inference(cfg, torch.device("cpu"), torch.float32, run / "adapter", merge=True)
    merged = load_for_inference(fast_cfg, torch.device("cpu"), torch.float32, run / "adapter", merge=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules()) == 12
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, four_bit(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_damaged_adapter_folder_is_a_one_line_error_before_any_model_loads(quant_run, tmp_path, capsys,
                                                                            no_model_loads):
    _, run = quant_run
    no_weights = run_with_config(tmp_path, run, "no_weights")
    (no_weights / "adapter" / "adapter_model.safetensors").unlink()
    bad_json = run_with_config(tmp_path, run, "bad_json")
    (bad_json / "adapter" / "adapter_config.json").write_text("{")
    truncated = run_with_config(tmp_path, run, "truncated")
    weights = truncated / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])

    for command in (["eval", "--run"], ["predict", "--text-file", "-", "--run"]):
        assert error_of([*command, str(no_weights)], capsys) == (
            f"{no_weights / 'adapter' / 'adapter_model.safetensors'}: missing; the adapter folder holds no weights "
            f"(copy them back, use a checkpoint's adapter, or retrain)")
    assert error_of(["eval", "--run", str(bad_json)], capsys).startswith(
        f"{bad_json / 'adapter' / 'adapter_config.json'}: not valid JSON (")
    assert error_of(["eval", "--run", str(truncated)], capsys).startswith(
        f"{weights}: not a readable safetensors file (")
