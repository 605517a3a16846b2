"""The micro-batch probe: what it tries, in which order, and that it leaves no trace."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import summ.speed.micro_batch as mb
from summ.speed.micro_batch import MicroBatching, choose_micro_batching
from summ.model import build_model
from tests.conftest import TINY, tiny_config

FOUR_LAYERS = {**TINY["phi"]["overrides"], "num_hidden_layers": 4}


def recompute_flags(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.fixture
def checkpointed(tmp_path):
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": True},
                      train={"micro_batch_size": 1, "grad_accum_steps": 8})
    return cfg, build_model(cfg, torch.device("cpu"), torch.float32)


def gpu_like(model):
    """An accelerator that says cuda, for the probe's search; `_fits` is replaced in these tests."""
    return SimpleNamespace(device=torch.device("cuda"), num_processes=1, unwrap_model=lambda m: m)


def test_probe_tries_the_whole_step_recomputing_fewest_layers_first_then_halves(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": True, "config_overrides": FOUR_LAYERS},
                      train={"micro_batch_size": 1, "grad_accum_steps": 8})
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    tried = []

    def fits_up_to_two_rows(model, rows, length, accelerator):
        tried.append((rows, length, recompute_flags(model)))
        return rows <= 2 and all(recompute_flags(model))

    monkeypatch.setattr(mb, "_fits", fits_up_to_two_rows)
    chosen = choose_micro_batching(model, cfg, gpu_like(model))
    assert chosen == MicroBatching(tokens=256, recomputed_layers=4, layers=4, chosen_by="probe")
    none, all_ = [False] * 4, [True] * 4
    assert tried == [(8, 128, none), (8, 128, [True, False, False, False]), (8, 128, [True, False, True, False]),
                     (8, 128, [True, True, False, True]), (8, 128, all_), (4, 128, all_), (2, 128, all_)]
    assert recompute_flags(model) == all_
    assert chosen.describe() == ("micro-batches of up to 256 tokens (found by the memory probe), "
                                 "recomputing all of 4 decoder layers")


def test_probe_keeps_the_first_partial_recompute_that_fits_the_whole_step(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": True, "config_overrides": FOUR_LAYERS},
                      train={"micro_batch_size": 1, "grad_accum_steps": 8})
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(mb, "_fits", lambda model, rows, length, accelerator: sum(recompute_flags(model)) >= 2)
    chosen = choose_micro_batching(model, cfg, gpu_like(model))
    assert chosen == MicroBatching(1024, 2, 4, "probe")
    assert recompute_flags(model) == [True, False, True, False]
    assert chosen.describe() == ("micro-batches of up to 1024 tokens (found by the memory probe), "
                                 "recomputing 2 of 4 decoder layers")


def test_ranks_agree_on_the_most_cautious_choice(tmp_path, monkeypatch):
    """Every rank must run the same micro-batches: a rank that fits the whole step without recompute
    follows another that needed half the layers recomputed; nothing fitting anywhere wins over all."""
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": True, "config_overrides": FOUR_LAYERS},
                      train={"micro_batch_size": 1, "grad_accum_steps": 8})
    model = build_model(cfg, torch.device("cpu"), torch.float32)

    def rank(fits, others):
        """This rank's choice, given the other ranks' choices."""
        accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=1 + len(others),
                                      unwrap_model=lambda m: m)
        monkeypatch.setattr(mb, "_fits", lambda model, rows, length, accelerator: fits(model))
        monkeypatch.setattr("accelerate.utils.gather_object", lambda mine: mine + others)
        return choose_micro_batching(model, cfg, accelerator)

    needs_half = (1024, 2)
    assert rank(lambda model: sum(recompute_flags(model)) >= 2, []) == MicroBatching(*needs_half, 4, "probe")
    assert rank(lambda model: True, [needs_half, (1024, 1)]) == MicroBatching(1024, 2, 4, "probe")
    assert recompute_flags(model) == [True, False, True, False]
    assert rank(lambda model: True, [(512, 4), needs_half]) == MicroBatching(512, 4, 4, "probe")
    # A rank where nothing fits: the run stops everywhere (recompute back on all layers meanwhile).
    assert rank(lambda model: True, [needs_half, None]) is None
    assert recompute_flags(model) == [True] * 4


def test_probe_keeps_recompute_off_when_the_whole_step_fits_without_it(checkpointed, monkeypatch):
    cfg, model = checkpointed
    monkeypatch.setattr(mb, "_fits", lambda model, rows, length, accelerator: True)
    chosen = choose_micro_batching(model, cfg, gpu_like(model))
    assert chosen == MicroBatching(1024, 0, 2, "probe") and not chosen.recompute
    assert recompute_flags(model) == [False, False]
    assert chosen.describe() == ("micro-batches of up to 1024 tokens (found by the memory probe), "
                                 "not recomputing layer activations")


def test_probe_leaves_a_partial_recompute_setting_alone_and_reports_nothing_fits(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": True, "checkpointed_layers": 1},
                      train={"micro_batch_size": 2, "grad_accum_steps": 2})
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    before = recompute_flags(model)
    tried = []
    monkeypatch.setattr(mb, "_fits", lambda model, rows, length, accelerator: tried.append(rows) or False)
    assert choose_micro_batching(model, cfg, gpu_like(model)) is None
    assert tried == [4, 2, 1] and recompute_flags(model) == before == [True, False]


def test_a_set_budget_or_no_auto_is_used_as_given(tmp_path):
    cpu = Accelerator(cpu=True)
    cfg = tiny_config(tmp_path, train={"micro_batch_tokens": 300})
    assert choose_micro_batching(None, cfg, cpu) == MicroBatching(300, 0, 0, "config")
    cfg = tiny_config(tmp_path, train={"auto_micro_batch": False})
    assert choose_micro_batching(None, cfg, cpu) == MicroBatching(None, 0, 0, "as stated")
    cfg = tiny_config(tmp_path, train={"micro_batch_size": 2, "grad_accum_steps": 3})
    assert choose_micro_batching(None, cfg, cpu) == MicroBatching(768, 0, 0, "whole step")


@pytest.mark.parametrize("checkpointing, layers, recomputed", [(False, None, 0), (True, None, 2), (True, 1, 1),
                                                                 (True, 9, 2)])
def test_the_recompute_reported_without_a_probe_is_the_configs(tmp_path, checkpointing, layers, recomputed):
    cfg = tiny_config(tmp_path, model={"gradient_checkpointing": checkpointing, "checkpointed_layers": layers})
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    chosen = choose_micro_batching(model, cfg, Accelerator(cpu=True))
    assert chosen == MicroBatching(512, recomputed, 2, "whole step")
    assert recompute_flags(model) == ([True] * 2 if checkpointing and layers is None else
                                      [True, False] if layers == 1 else [checkpointing] * 2)


def test_one_probe_changes_no_weight_no_random_state_and_leaves_no_gradient(checkpointed):
    cfg, model = checkpointed
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert mb._fits(model, 3, 128, Accelerator(cpu=True)) is True
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("error, fits", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
])
def test_a_probe_that_runs_out_of_memory_says_it_does_not_fit_and_restores_the_model(checkpointed, monkeypatch,
                                                                                    error, fits):
    cfg, model = checkpointed
    model.eval()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(mb, "forward_summed_loss", fail)
    assert mb._fits(model, 2, 128, Accelerator(cpu=True)) is fits
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_a_probe_does_not_hide_an_error_that_is_not_about_memory(checkpointed, monkeypatch):
    cfg, model = checkpointed

    def fail(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)")

    monkeypatch.setattr(mb, "forward_summed_loss", fail)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied"):
        mb._fits(model, 2, 128, Accelerator(cpu=True))
