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


def test_default_targets_follow_the_architecture():
    cfg = config_from_dict({"model": {"name_or_path": str(FIXTURES / "phi-2")}, "data": {"dataset": "x"}})
    model = lora_on_meta(cfg)
    assert model.get_nb_trainable_parameters()[0] == 10_485_760


@pytest.mark.parametrize("upcast", [False, True])
def test_frozen_weights_stay_in_compute_dtype_unless_asked(tmp_path, upcast):
    import dataclasses

    from summ.model import build_model
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, quant=True)
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, upcast_frozen=upcast))
    model = build_model(cfg, torch.device("cpu"), torch.bfloat16)
    frozen = torch.float32 if upcast else torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == frozen
    assert model.get_output_embeddings().weight.dtype == frozen
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
