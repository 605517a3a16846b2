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
