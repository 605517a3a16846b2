"""The 8-bit AdamW without bitsandbytes' per-tensor device waits: the same updates and states as
bitsandbytes' own step, no wait once the states exist, and bitsandbytes' step whenever the waits matter."""

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from summ.config import TrainConfig
from summ.optimizer import StepUndo, make_optimizer, stream_ordered_adamw_8bit
from tests.conftest import gpu


def lora_like_params(seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    """Adapter-shaped tensors (r=16 against 2,560 features: above bitsandbytes' 4,096-element floor
    for 8-bit states) plus one small tensor that keeps 32-bit states."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(16, 2560, generator=g) * 0.02 for _ in range(4)] + [torch.randn(64, generator=g)]
    return [torch.nn.Parameter(t.to(device)) for t in tensors]


def set_grads(params, step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g).to(p.device)


@pytest.fixture
def sync_calls(monkeypatch):
    calls = []
    real = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: (calls.append(t), real(t)))
    return calls


def test_same_parameters_and_states_as_bitsandbytes_step():
    ours_params, theirs_params = lora_like_params(0), lora_like_params(0)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours = stream_ordered_adamw_8bit(False)(ours_params, **kwargs)
    theirs = bnb.optim.AdamW8bit(theirs_params, **kwargs)
    for step in range(4):
        skip = 1 if step == 2 else None  # a tensor without a gradient this step is left alone
        for params, optimizer in ((ours_params, ours), (theirs_params, theirs)):
            set_grads(params, step, skip)
            optimizer.step()
    for a, b in zip(ours_params, theirs_params):
        assert torch.equal(a, b)
    for a, b in zip(ours_params, theirs_params):
        mine, bnbs = ours.state[a], theirs.state[b]
        assert sorted(mine) == sorted(bnbs)
        for key, value in mine.items():
            assert torch.equal(value, bnbs[key]) if torch.is_tensor(value) else value == bnbs[key], key
    assert ours.state[ours_params[0]]["state1"].dtype == torch.uint8  # 8-bit states, as bitsandbytes chose


def test_no_device_wait_once_states_exist(sync_calls):
    params = lora_like_params(0)
    optimizer = stream_ordered_adamw_8bit(False)(params, lr=1e-3)
    set_grads(params, 0)
    optimizer.step()  # creates the states through bitsandbytes' own step, one wait per tensor
    assert len(sync_calls) == len(params)
    sync_calls.clear()
    for step in (1, 2):
        set_grads(params, step)
        optimizer.step()
    assert sync_calls == []
    stock = bnb.optim.AdamW8bit(lora_like_params(0), lr=1e-3)
    for step in (0, 1):
        for p in stock.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        stock.step()
    assert len(sync_calls) == 2 * len(params)


def test_bitsandbytes_step_whenever_the_waits_matter():
    params = lora_like_params(0)
    optimizer = stream_ordered_adamw_8bit(False)(params, lr=1e-3)
    assert not optimizer._stream_ordered()  # no states yet
    set_grads(params, 0)
    optimizer.step()
    assert optimizer._stream_ordered()
    extra = torch.nn.Parameter(torch.randn(16, 2560))
    optimizer.add_param_group({"params": [extra]})
    extra.grad = torch.randn_like(extra)
    assert not optimizer._stream_ordered()  # a new tensor's first step creates its state
    optimizer.step()
    assert optimizer._stream_ordered()
    optimizer.state[params[0]]["state1"].is_paged = True  # what bitsandbytes marks managed memory with
    assert not optimizer._stream_ordered()


@pytest.mark.parametrize("name, expected", [("adamw_8bit", "StreamOrderedAdamW8bit"),
                                            ("paged_adamw_8bit", "StreamOrderedAdamW8bit"),  # a CPU pages nothing
                                            ("adamw", "AdamW")])
def test_make_optimizer_on_cpu(name, expected):
    model = torch.nn.Linear(8, 4)
    optimizer = make_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.1), torch.device("cpu"))
    assert type(optimizer).__name__ == expected
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # the bias gets no decay


@gpu
def test_on_a_gpu_updates_follow_the_gradients_queued_before_them(sync_calls):
    """The gradients are still being written by queued kernels when `step()` is called: the
    stream alone must order the update after them, as bitsandbytes' waits do."""
    cuda = torch.device("cuda")
    updated, waits, optimizers = [], [], []
    for optimizer_class in (stream_ordered_adamw_8bit(True), bnb.optim.PagedAdamW8bit):
        params = lora_like_params(0, "cuda")
        optimizer = optimizer_class(params, lr=1e-3)
        optimizers.append(optimizer)
        busy = torch.randn(4096, 4096, device=cuda)
        sync_calls.clear()
        for step in range(3):
            set_grads(params, step)
            final = [p.grad.clone() for p in params]
            torch.cuda.synchronize()
            for p in params:
                p.grad.zero_()  # an update that ran before the queued work would see zero gradients
            for _ in range(30):  # tens of milliseconds of queued work before the gradients are final
                busy = busy @ busy
                busy = busy / busy.norm()
            for p, g in zip(params, final):
                p.grad.add_(g * busy.norm().pow(0))  # x**0 == 1: the gradient, written after the queued work
            optimizer.step()
        torch.cuda.synchronize()
        assert not any(getattr(optimizer.state[p]["state1"], "is_paged", False) for p in params)
        updated.append([p.detach().cpu() for p in params])
        waits.append(len(sync_calls))
    assert all(torch.equal(a, b) for a, b in zip(*updated))
    # ours: bitsandbytes' waits on the first step only (one per tensor, one for the paged optimizer)
    assert waits == [len(params) + 1, 3 * (len(params) + 1)]
    ours = optimizers[0]
    assert ours._stream_ordered()
    with torch.cuda.stream(torch.cuda.Stream()):  # bitsandbytes launches on the default stream: not ordered here
        assert not ours._stream_ordered()


def adapter_like_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2560, 16, bias=False), torch.nn.Linear(16, 64))


def step_with(model, optimizer, grad_value: float | None, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) if grad_value is None else torch.full_like(p, grad_value)
    optimizer.step()


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw"])
def test_step_undo_takes_a_non_finite_step_back_bit_for_bit(name):
    cpu, t = torch.device("cpu"), TrainConfig(optimizer=name, weight_decay=0.01)
    models = [adapter_like_model(0), adapter_like_model(0)]
    optimizers = [make_optimizer(m, t, cpu) for m in models]
    undo = StepUndo(optimizers[0])
    assert not undo.ready()  # no state before the first step: nothing to take back to
    for model, optimizer in zip(models, optimizers):
        step_with(model, optimizer, None, seed=1)
    assert undo.ready()

    # The first model takes a step with NaN gradients, which is undone; the second never sees it.
    undo.save()
    step_with(models[0], optimizers[0], float("nan"), seed=2)
    assert torch.isnan(next(models[0].parameters())).all()
    undo.restore()
    for model, optimizer in zip(models, optimizers):
        step_with(model, optimizer, None, seed=3)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        mine, twin = optimizers[0].state[a], optimizers[1].state[b]
        assert sorted(mine) == sorted(twin)
        for key in mine:
            assert torch.equal(mine[key], twin[key]) if torch.is_tensor(mine[key]) else mine[key] == twin[key], key


def test_step_hooks_run_once_per_step_even_when_bitsandbytes_class_is_hooked_too():
    # torch hooks a class's step when the class is first used: here both bitsandbytes' and ours.
    bnb.optim.AdamW8bit(lora_like_params(1), lr=1e-3)
    params = lora_like_params(0)
    optimizer = stream_ordered_adamw_8bit(False)(params, lr=1e-3)
    calls = []
    handle = register_optimizer_step_post_hook(lambda *_: calls.append(1))
    try:
        for step in (0, 1):  # bitsandbytes' own step (states created), then ours
            set_grads(params, step)
            optimizer.step()
    finally:
        handle.remove()
    assert calls == [1, 1]
