"""The optimizer: bitsandbytes' 8-bit AdamW (paged on a GPU) or torch's AdamW, biases and norms undecayed."""

import pytest
import torch

from summ.config import TrainConfig
from summ.optimizer import make_optimizer


@pytest.mark.parametrize("name, expected", [("adamw_8bit", "AdamW8bit"),
                                            ("paged_adamw_8bit", "AdamW8bit"),  # a CPU pages nothing
                                            ("adamw", "AdamW")])
def test_make_optimizer_on_cpu(name, expected):
    model = torch.nn.Linear(8, 4)
    optimizer = make_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.1), torch.device("cpu"))
    assert type(optimizer).__name__ == expected
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # the bias gets no decay


def test_adapter_sized_tensors_keep_8bit_states():
    """r=16 against 2,560 features is above bitsandbytes' 4,096-element floor for 8-bit states."""
    model = torch.nn.Linear(2560, 16, bias=False)
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw_8bit"), torch.device("cpu"))
    model.weight.grad = torch.randn_like(model.weight)
    optimizer.step()
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8
