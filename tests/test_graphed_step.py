"""train.cuda_graphs: fixed-shape micro-batches give the loss and gradients of the batches they pad
(CPU), the settings a graph cannot run are refused before anything loads, and on a CUDA GPU the
recorded graphs train as the eager loop does and resume exactly (`make test-gpu`)."""

import dataclasses
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import AttentionInterface

from summ.config import ConfigError
from summ.data import IGNORE_INDEX, collate
from summ.loss import forward_summed_loss
from summ.model import build_model
from summ.speed.graphs import (GRAPH_ATTENTION, GraphedMicroSteps, causal_sdpa, check_graph_launch, graph_attention,
                               static_inputs, static_summed_loss)
from summ.speed.micro_batch import MicroBatching, choose_micro_batching
from summ.speed.step import StepRunner, setup_step_runner
from summ.training import train
from tests.conftest import gpu, tiny_config
from tests.test_train import accumulate, examples_for, lora_grads, ragged_rows


def test_static_inputs_pad_rows_length_and_head_positions():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8], [-100, 10, -100, -100]])}
    inputs = static_inputs(batch, rows=3, length=6, pad_id=0, bucket=4)
    assert inputs.input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    # Positions 0 (predicts 10 in row 2), 1 and 2 carry a label; one filler makes a multiple of 4.
    assert inputs.positions.tolist() == [0, 1, 2, 0]
    assert inputs.targets.tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100], [-100, -100, -100, -100]]
    # A count past length - 1 is capped there: every position the head can score.
    assert static_inputs(batch, rows=2, length=4, pad_id=0, bucket=4).positions.tolist() == [0, 1, 2]


def test_graph_attention_switches_sdpa_alone_and_restores_it():
    """Eager attention adds its mask to the scores and builds the same mask while recording, and only
    a mask carries a sliding window shorter than the rows: graphs leave both as they are."""
    # (attention, sliding window, what runs inside): a window shorter than the rows needs its mask.
    for attn, window, inside in (("sdpa", None, GRAPH_ATTENTION), ("sdpa", 128, GRAPH_ATTENTION),
                                 ("sdpa", 127, "sdpa"), ("eager", None, "eager")):
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn, sliding_window=window))
        with graph_attention(model, 128):
            assert model.config._attn_implementation == inside
        assert model.config._attn_implementation == attn
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    with pytest.raises(RuntimeError, match="^inside$"), graph_attention(model, 128):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_a_micro_batch_runs_at_its_width_rounded_up_to_a_multiple_of_16():
    graphed = GraphedMicroSteps(torch.nn.Linear(1, 1), SimpleNamespace(device=torch.device("cpu")), rows=4,
                                length=200, pad_id=0)
    widths = {w: graphed.length_for({"input_ids": torch.zeros((2, w))}) for w in (8, 64, 72, 136, 192, 200)}
    assert widths == {8: 16, 64: 64, 72: 80, 136: 144, 192: 192, 200: 200}


def test_a_micro_batch_larger_than_the_graph_is_refused():
    batch = {"input_ids": torch.zeros((3, 8), dtype=torch.long), "labels": torch.zeros((3, 8), dtype=torch.long)}
    with pytest.raises(ValueError, match=r"^a micro-batch of 3 rows x 8 tokens does not fit the graph's 2 x 8$"):
        static_inputs(batch, rows=2, length=8, pad_id=0)


@pytest.mark.parametrize("arch, quant", [("phi", False), ("llama", False), ("phi", True)])
def test_fixed_shape_micro_batch_gives_the_loss_and_gradient_of_the_batch(tmp_path, monkeypatch, arch, quant):
    """What a graph records (rows and length padded, bucketed head positions, causal attention with
    no mask) equals the loop's forward on the batch itself (with its padding mask): padding is never
    seen by a labelled token and never scored."""
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, GRAPH_ATTENTION,
                        lambda *args, **kwargs: calls.append(1) or causal_sdpa(*args, **kwargs))
    cfg = tiny_config(tmp_path, arch, quant=quant, model={"attn_implementation": "sdpa"})
    tok, ex = ragged_rows(cfg)
    batch = collate(ex, tok.pad_token_id)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    model.train()
    expected_loss = forward_summed_loss(model, batch)
    expected_loss.backward()
    expected = lora_grads(model)

    inputs = static_inputs(batch, rows=5, length=136, pad_id=tok.pad_token_id)
    assert inputs.input_ids.shape == (5, 136) and inputs.positions.numel() % 64 == 0
    assert int((inputs.targets != IGNORE_INDEX).sum()) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # SDPA as the model runs it, then as graphs run it: causal_sdpa, once per decoder layer.
    for attention, graph_calls in ((lambda model: nullcontext(), 0), (lambda model: graph_attention(model, 136), 2)):
        model.zero_grad()
        with attention(model):
            loss = static_summed_loss(model, inputs)
            loss.backward()
        assert len(calls) == graph_calls
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
        for name, grad in lora_grads(model).items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


def test_a_step_runs_longest_rows_first_in_groups_of_the_graphs_rows(tmp_path):
    cfg = tiny_config(tmp_path)
    tok, ex = examples_for(cfg, 8)
    for i, e in enumerate(ex):  # row i has 40 + 10 i tokens, its last 5 labelled
        e.input_ids, e.labels = e.input_ids[:40 + 10 * i], e.labels[:40 + 10 * i]
        e.labels[-5:] = e.input_ids[-5:]
    runner = StepRunner(None, cfg, None, ex, [len(e.input_ids) for e in ex], tok.pad_token_id,
                        MicroBatching(None, 0, 0, "as stated"), SimpleNamespace(rows=3))
    batches = runner.batches([[0, 1], [2, 3], [4, 5], [6, 7]])
    for batch, rows in zip(batches, ([7, 6, 5], [4, 3, 2], [1, 0]), strict=True):
        assert torch.equal(batch["input_ids"], collate([ex[i] for i in rows], tok.pad_token_id)["input_ids"])


def test_graphs_are_recorded_ahead_for_the_windows_a_run_has_left(tmp_path):
    """Resumed at step 2 (epoch 0, window 2) of 5, in two epochs of 3 windows: the windows recorded
    ahead are epoch 0's third and epoch 1's first two (the run stops at its total steps)."""
    from summ.training import remaining_windows

    cfg = tiny_config(tmp_path, train={"epochs": 2})
    tok, ex = examples_for(cfg, 6)
    windows = {0: [[[0], [1]], [[2], [3]], [[4], [5]]], 1: [[[5], [4]], [[3], [2]], [[1], [0]]]}
    data = SimpleNamespace(plan=SimpleNamespace(windows=windows.get))
    seen = []
    graphed = SimpleNamespace(rows=1, record_ahead=lambda batches: len(seen.extend(batches) or seen))
    runner = StepRunner(None, cfg, SimpleNamespace(print=lambda *a: None), ex, [len(e.input_ids) for e in ex],
                        tok.pad_token_id, MicroBatching(None, 0, 0, "as stated"), graphed)
    steps = list(remaining_windows(data, epochs=2, epoch=0, window=2, steps_left=3))
    assert [after for after, _ in steps] == [(1, 0), (1, 1), (1, 2)]
    runner.record_graphs(window for _, window in steps)
    expected = [runner.batches(w) for w in (windows[0][2], windows[1][0], windows[1][1])]
    assert len(seen) == 6
    for batch, want in zip(seen, [b for w in expected for b in w], strict=True):
        assert torch.equal(batch["input_ids"], want["input_ids"])


class EagerStandIn:
    """What GraphedMicroSteps.step computes, run eagerly: the loop's side of graphs, testable on a CPU."""

    def __init__(self, model, rows, length, pad_id):
        self.model, self.rows, self.length, self.pad_id = model, rows, length, pad_id

    def step(self, batch, loss_scale):
        summed = static_summed_loss(self.model, static_inputs(batch, self.rows, self.length, self.pad_id))
        (summed * loss_scale).backward()
        return summed.detach()


def test_the_loop_normalises_graphed_micro_batches_by_the_windows_label_tokens(tmp_path):
    """queue_gradients through the graph interface: one window of 5 rows as micro-batches of 2
    fixed-shape rows gives the loss and gradient of the same window run eagerly in one batch."""
    cfg = tiny_config(tmp_path, "llama", model={"attn_implementation": "sdpa"})
    tok, ex = examples_for(cfg, 5)
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg, accelerator.device, torch.float32)
    model.train()
    eager_loss, eager_tokens = accumulate(model, [collate(ex, tok.pad_token_id)], accelerator)
    eager = lora_grads(model)
    model.zero_grad()
    batches = [collate(ex[s:s + 2], tok.pad_token_id) for s in (0, 2, 4)]
    loss, tokens = accumulate(model, batches, accelerator, EagerStandIn(model, 2, 128, tok.pad_token_id))
    assert (loss, tokens) == (pytest.approx(eager_loss, rel=1e-6), eager_tokens)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sets, rows", [({}, 8), ({"micro_batch_tokens": 256}, 2),
                                        ({"micro_batch_tokens": 100}, 1), ({"auto_micro_batch": False}, 1)])
def test_graphs_run_as_many_full_rows_as_the_budget_holds(tmp_path, sets, rows):
    cfg = tiny_config(tmp_path, train={"micro_batch_size": 1, "grad_accum_steps": 8, "cuda_graphs": True, **sets})
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, print=lambda *a: None,
                                  unwrap_model=lambda m: m)
    model = build_model(cfg, accelerator.device, torch.float32)
    graphed = setup_step_runner(model, cfg, accelerator, [], [], 0).graphed
    assert (graphed.rows, graphed.length) == (rows, 128)


def test_cuda_graphs_are_refused_with_packing(tmp_path):
    with pytest.raises(ConfigError, match=r"^tiny: 'train.cuda_graphs' must be false with train.packing \(a graph "
                                          r"runs fixed-shape padded micro-batches\), got True$"):
        tiny_config(tmp_path, train={"cuda_graphs": True, "packing": True})


def test_cuda_graphs_need_a_gpu_and_one_process(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.cuda_graphs: runs on one process \(this launch has 2\); set it to "
                                          r"false for data-parallel training$"):
        check_graph_launch(SimpleNamespace(device=torch.device("cuda"), num_processes=2))
    if torch.cuda.is_available():
        return
    # Refused before the run folder is made or a model loads.
    cfg = tiny_config(tmp_path / "run", train={"cuda_graphs": True})
    with pytest.raises(ConfigError, match=r"^train.cuda_graphs: needs a CUDA GPU \(this run is on cpu\); set it "
                                          r"to false$"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- on a CUDA GPU


def graphed_and_eager(tmp_path, train_settings=None, **model_settings):
    """Loss and LoRA gradients of one window, eager and through graphs, on the same weights. Its
    three micro-batches make three graphs sharing a pool: two of 128 tokens whose head positions
    round to different counts, recorded ahead, and one of short rows that runs at 64 tokens,
    recorded when first met (after a warm-up run on top of the pool, with gradients already added
    by two replays). The window runs in order, then in reverse."""
    cfg = tiny_config(tmp_path, "phi", quant=True, model={"attn_implementation": "sdpa", **model_settings},
                      train=train_settings or {})
    tok, ex = examples_for(cfg, 8)
    for e in ex[:3]:  # long summaries: labels on more positions in the first micro-batch
        e.labels[-70:] = e.input_ids[-70:]
    for e in ex[6:]:  # short rows, the last 10 tokens labelled
        e.input_ids, e.labels = e.input_ids[:50], e.labels[:50]
        e.labels[-10:] = e.input_ids[-10:]
    batches = [collate(ex[:3], tok.pad_token_id), collate(ex[3:6], tok.pad_token_id), collate(ex[6:], tok.pad_token_id)]
    accelerator = Accelerator()
    model = build_model(cfg, accelerator.device, torch.float32)
    model.train()
    eager_loss, _ = accumulate(model, batches, accelerator)
    eager = lora_grads(model)
    model.zero_grad(set_to_none=True)
    graphed = GraphedMicroSteps(model, accelerator, rows=3, length=128, pad_id=tok.pad_token_id)
    assert graphed.record_ahead(batches[:2]) == 2
    results = []
    for window in (batches, batches[::-1]):
        model.zero_grad(set_to_none=False)
        results.append((accumulate(model, window, accelerator, graphed)[0], lora_grads(model)))
    return eager_loss, eager, results, graphed


@gpu
@pytest.mark.parametrize("settings", [{}, {"compile_layers": True}, {"gradient_checkpointing": True},
                                      {"compile_layers": True, "train_settings": {"cuda_graphs": True}}],
                         ids=["4bit", "compiled", "recompute", "compiled-for-graphs"])
def test_graphs_give_the_eager_loss_and_gradient(tmp_path, monkeypatch, settings):
    # A compiled layer that could not run its compiled code while recording fails here instead of
    # being recorded eagerly.
    monkeypatch.setattr("summ.speed.graphs.CAPTURE_STANCE", "fail_on_recompile")
    eager_loss, eager, results, graphed = graphed_and_eager(tmp_path, **settings)
    assert sorted(length for length, _ in graphed.graphs) == [64, 128, 128]
    for loss, grads in results:
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager[name], rtol=1e-3, atol=1e-6)


def graph_run(tmp_path, name, dropout=0.1, **train_settings):
    return tiny_config(tmp_path / name, "phi", quant=True, model={"attn_implementation": "sdpa"},
                       lora={"r": 4, "alpha": 8, "dropout": dropout},
                       train={"micro_batch_size": 1, "grad_accum_steps": 4, "save_every": 2, "keep_last": 5, "epochs": 2,
                              **train_settings},
                       eval={"at_end": False, "generate": False})


@gpu
def test_a_graphed_run_resumes_exactly_and_tracks_the_eager_run(tmp_path):
    """Dropout on: replays draw fresh random numbers from the generator the checkpoint saves, so a
    run resumed from step 2 of 6 (recording its graphs anew) gives the uninterrupted run's losses."""
    whole = train(graph_run(tmp_path, "whole", cuda_graphs=True))
    assert whole.steps == 6
    resumed = train(graph_run(tmp_path, "resumed", cuda_graphs=True),
                    resume=tmp_path / "whole" / "checkpoints" / "step-0000002")
    assert resumed.steps == 6
    assert resumed.train_losses == whole.train_losses
    # Without dropout the graphed run follows the eager one step for step.
    eager = train(graph_run(tmp_path, "eager", dropout=0.0, cuda_graphs=False))
    graphed = train(graph_run(tmp_path, "graphed", dropout=0.0, cuda_graphs=True))
    assert graphed.train_losses == pytest.approx(eager.train_losses, rel=1e-4)
