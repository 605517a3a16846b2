import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from summ.checkpoint import latest_checkpoint
from summ.config import ConfigError
from summ.data import Encoder, collate, encode_rows, load_rows
from summ.model import build_model, load_tokenizer
from summ.loss import evaluate_loss
import summ.speed.step as step_module
from summ.speed.step import queue_gradients
from summ.training import TrainingDiverged, make_scheduler, train
from tests.conftest import TINY, tiny_config


def accumulate(model, batches: list[dict], accelerator, graphed=None) -> tuple[float, int]:
    """Forward and backward over one window; (its mean loss per label token, its non-pad tokens)."""
    loss_sum, n_labels, tokens = queue_gradients(model, batches, accelerator, graphed)
    return loss_sum.item() / max(n_labels, 1), tokens

REPO = Path(__file__).parents[1]


def examples_for(cfg, n):
    tok = load_tokenizer(cfg)
    rows, _ = load_rows(cfg.data, "train", n)
    return tok, encode_rows(Encoder(tok, cfg.data), rows, "train")


def ragged_rows(cfg, n=3):
    """`n` examples whose second row ends early (90 tokens, the last 10 labelled), so a batch of them pads."""
    tok, ex = examples_for(cfg, n)
    ex[1].input_ids, ex[1].labels = ex[1].input_ids[:90], ex[1].labels[:90]
    ex[1].labels[-10:] = ex[1].input_ids[-10:]
    return tok, ex


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, quant", [("phi", False), ("llama", False), ("phi", True)])
def test_accumulation_normalises_by_window_tokens(tmp_path, arch, quant):
    """bs1 x ga4 and bs4 x ga1 give the same gradient; a mean of per-micro-batch means does not."""
    cfg = tiny_config(tmp_path, arch, quant=quant)
    tok, ex = examples_for(cfg, 4)
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg, accelerator.device, torch.float32)
    model.train()

    accumulate(model, [collate([e], tok.pad_token_id) for e in ex], accelerator)
    one_by_one = lora_grads(model)
    model.zero_grad()
    accumulate(model, [collate(ex, tok.pad_token_id)], accelerator)
    together = lora_grads(model)
    assert len(together) == 16  # 2 layers x 4 target modules x (lora_A, lora_B)
    for name in together:
        torch.testing.assert_close(one_by_one[name], together[name], rtol=1e-4, atol=1e-7)

    # The naive recipe (HF-style mean per micro-batch, averaged) weights rows differently.
    model.zero_grad()
    for e in ex:
        b = collate([e], tok.pad_token_id)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.div(4).backward()
    naive = lora_grads(model)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert (flat(naive) - flat(together)).norm() / flat(together).norm() > 1e-3


@pytest.mark.parametrize("arch, attention", [("phi", "eager"), ("llama", "eager"), ("phi", "sdpa"),
                                              ("llama", "sdpa")])
def test_packed_rows_give_the_loss_and_gradient_of_the_padded_batch(tmp_path, arch, attention):
    """Packing (one sequence, position ids restarting per row, no padding) changes nothing but speed:
    attention stays inside each row and no target crosses into the next row."""
    from summ.data import collate_packed

    cfg = tiny_config(tmp_path, arch, model={"attn_implementation": attention})
    tok, ex = examples_for(cfg, 4)
    for e, n in zip(ex[1:3], (90, 61)):  # rows of different lengths, so the padded batch pads
        e.input_ids, e.labels = e.input_ids[:n], e.labels[:n]
        e.labels[-10:] = e.input_ids[-10:]
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg, accelerator.device, torch.float32)
    model.train()
    # Rows of 128, 90, 61 and 128 tokens in sequences of up to 256: [128, 128] and [90, 61] + 105 padding.
    packed = collate_packed(ex, 256, tok.pad_token_id)
    assert packed["input_ids"].shape == (2, 256) and int(packed["attention_mask"].sum()) == 407
    assert packed["position_ids"][1, 89:92].tolist() == [89, 0, 1]
    padded_loss, _ = accumulate(model, [collate(ex, tok.pad_token_id)], accelerator)
    padded = lora_grads(model)
    model.zero_grad()
    packed_loss, _ = accumulate(model, [packed], accelerator)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, padded[name], rtol=1e-4, atol=1e-6)

    # Without the restarting position ids the rows would attend to each other: a different loss.
    model.zero_grad()
    crossed, _ = accumulate(model, [{k: v for k, v in packed.items() if k != "position_ids"}], accelerator)
    assert abs(crossed - padded_loss) > 1e-3


def test_compiled_decoder_layers_give_the_same_loss_and_gradient(tmp_path):
    """model.compile_layers: each decoder layer through torch.compile (inductor), recompute on."""
    cfg = tiny_config(tmp_path, "llama", model={"gradient_checkpointing": True, "attn_implementation": "sdpa"})
    tok, ex = examples_for(cfg, 4)
    accelerator = Accelerator(cpu=True)
    results = []
    for compiled in (False, True):
        model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile_layers=compiled)),
                            accelerator.device, torch.float32)
        model.train()
        loss, _ = accumulate(model, [collate(ex, tok.pad_token_id)], accelerator)
        results.append((loss, lora_grads(model), model))
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in results[1][2].modules()) == 2
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_layers_with_eager_random_numbers_draw_the_eager_dropout_masks(tmp_path):
    """Layers compiled for CUDA graphs draw dropout with torch's kernel: with dropout on (LoRA 0.3,
    Phi-2's residual 0.1), a compiled step from the same seed gives the eager step's loss and
    gradients; compiled without graphs, with inductor's own random numbers, it gives another loss."""
    overrides = {**TINY["phi"]["overrides"], "resid_pdrop": 0.1}
    cfg = tiny_config(tmp_path, "phi", lora={"r": 4, "alpha": 8, "dropout": 0.3},
                      model={"attn_implementation": "sdpa", "config_overrides": overrides})
    tok, ex = examples_for(cfg, 2)
    accelerator = Accelerator(cpu=True)
    results = []
    for compiled, graphs in ((False, False), (True, True), (True, False)):
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile_layers=compiled),
                                      train=dataclasses.replace(cfg.train, cuda_graphs=graphs))
        model = build_model(run_cfg, accelerator.device, torch.float32)
        model.train()
        torch.manual_seed(123)
        loss, _ = accumulate(model, [collate(ex, tok.pad_token_id)], accelerator)
        results.append((loss, lora_grads(model)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][name], rtol=1e-4, atol=1e-6)
    assert abs(results[2][0] - results[0][0]) > 1e-4 * abs(results[0][0])


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_head_on_labelled_positions_gives_the_full_loss_and_gradient(tmp_path, arch):
    """forward_summed_loss runs the LM head only where a label is; loss and gradients must equal
    those of full logits."""
    import torch.nn.functional as F

    from summ.loss import forward_summed_loss

    cfg = tiny_config(tmp_path, arch)
    tok, ex = ragged_rows(cfg)
    batch = collate(ex, tok.pad_token_id)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")
    full.backward()
    expected = lora_grads(model)
    model.zero_grad()
    kept = forward_summed_loss(model, batch)
    kept.backward()
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-4)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mbs, ga, execution, micro_batches_per_step", [
    (4, 1, {"auto_micro_batch": False}, 1),
    (1, 4, {}, 1),  # the default on a CPU: the step's 4 rows in one micro-batch
    (1, 4, {"micro_batch_tokens": 256}, 2),  # regrouped by a token budget: 2 rows of <= 128 each
    (1, 4, {"packing": True}, 1),  # one packed sequence per step
])
def test_train_bs1_ga4_matches_other_ways_to_run_the_same_rows(tmp_path, monkeypatch, mbs, ga, execution,
                                                               micro_batches_per_step):
    """The recipe's optimization (4 rows per step) gives the same steps however its rows are split
    into micro-batches: batch 1 x 4 as stated, one micro-batch, or a token budget."""

    calls = {"n": 0}
    real = step_module.forward_summed_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "forward_summed_loss", counted)
    runs = []
    for i, (m, g, how) in enumerate(((1, 4, {"auto_micro_batch": False}), (mbs, ga, execution))):
        # A large init scale and lr make each step move the loss by far more than the tolerance.
        cfg = tiny_config(tmp_path / f"run{i}", model={"config_overrides": {**TINY["phi"]["overrides"],
                                                                           "initializer_range": 0.2}},
                          train={"micro_batch_size": m, "grad_accum_steps": g, "length_grouping": False,
                                 "lr": 2e-2, **how}, eval={"at_end": False})
        calls["n"] = 0
        runs.append(train(cfg))
    assert calls["n"] == 3 * micro_batches_per_step
    assert runs[0].steps == runs[1].steps == 3
    assert runs[0].train_losses[2] < runs[0].train_losses[0] - 0.1
    torch.testing.assert_close(runs[0].train_losses, runs[1].train_losses, rtol=1e-5, atol=0)


# The first optimizer steps of the tiny models, pinned: a change to masking, loss normalisation,
# batching order, LoRA init or the optimizer moves these numbers by far more than the tolerance.
GOLDEN = {
    ("phi", False): ([10.868102434769417, 10.862075450808502, 10.85283654477416], 10.878987950602854),
    ("llama", False): ([10.363057609732824, 10.398336588541667], 10.378899989983974),
    ("phi", True): ([10.865733322587985, 10.8606141556141, 10.85243237920168], 10.87796813484252),
}


@pytest.mark.parametrize("arch, quant", sorted(GOLDEN))
def test_golden_losses_of_the_first_steps(tmp_path, arch, quant):
    result = train(tiny_config(tmp_path, arch, quant=quant))
    losses, val_loss = GOLDEN[(arch, quant)]
    assert result.train_losses == pytest.approx(losses, rel=0, abs=5e-5)
    assert result.metrics["final_val_loss"] == pytest.approx(val_loss, rel=0, abs=5e-5)


def test_cosine_schedule_with_warmup_shape():
    from summ.config import TrainConfig

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(lr=1.0, warmup_steps=5, lr_scheduler="cosine"), total_steps=25)
    lrs = []
    for _ in range(25):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[15] == pytest.approx(0.5)  # half-way through the decay
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_overfits_a_fixed_batch(tmp_path, arch):
    # At the default init scale (0.02) a 64-wide random lm_head cannot move logits by more than ~1 nat,
    # whatever the adapters learn; a larger scale gives the frozen head the range to overfit.
    overrides = {**TINY[arch]["overrides"], "initializer_range": 0.2}
    cfg = tiny_config(tmp_path, arch, model={"config_overrides": overrides}, data={"max_train_rows": 4},
                      train={"epochs": 30, "micro_batch_size": 4, "grad_accum_steps": 1, "lr": 2e-2,
                             "lr_scheduler": "constant"})
    result = train(cfg)
    losses = result.train_losses
    assert len(losses) == 30
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_train_eval_train_gradients_stay_exact_in_4bit(tmp_path, arch):
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first no-grad forward, after which
    LoRA gradients go wrong or crash; summ.model switches that off."""
    cfg = tiny_config(tmp_path, arch, quant=True)
    tok, ex = examples_for(cfg, 4)
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg, accelerator.device, torch.float32)
    batch = [collate(ex, tok.pad_token_id)]
    model.train()
    accumulate(model, batch, accelerator)
    before = lora_grads(model)
    model.zero_grad(set_to_none=True)
    evaluate_loss(model, ex, 2, tok.pad_token_id, accelerator)
    accumulate(model, batch, accelerator)
    after = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in after.values())
    for name in before:
        torch.testing.assert_close(after[name], before[name])


def test_run_writes_adapter_config_metrics_and_tensorboard(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path / "run", quant=True, log={"trackers": ["tensorboard"]}, eval={"at_start": True})
    result = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["steps"], metrics["trainable_params"]) == (3, 4096)  # 2 layers x 4 modules x r4 x (64+64)
    assert metrics["data"]["train"] == {"read": 12, "used": 12, "skipped": 0, "skipped_by_reason": {},
                                        "first_skipped": [], "duplicate_ids": 0}
    # 3 steps of 4 rows: each of the 12 rows once, every non-pad token counted.
    _, examples = examples_for(cfg, 12)
    assert metrics["tokens_seen"] == sum(len(e.input_ids) for e in examples)
    assert [e["step"] for e in metrics["eval_history"]] == [0, 3]
    assert math.isclose(metrics["final_val_perplexity"], math.exp(metrics["final_val_loss"]), rel_tol=1e-9)
    # One TensorBoard run per training run: the curves and the hyperparameters in one event file, the
    # HParams tab's metric columns naming the scalars it holds.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert [p.name for p in (run / "tensorboard").iterdir() if p.is_dir()] == []
    [events] = run.glob("tensorboard/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"val/loss", "train/loss"} <= set(accumulator.Tags()["scalars"])
    content = accumulator.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss", "val/perplexity", "train/loss"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["train.lr"].number_value == cfg.train.lr
    # What reproduces and serves the run: the prompt exactly as trained, versions and commit.
    prompt = json.loads((run / "prompt.json").read_text())
    assert prompt["prompt"] == TINY["phi"]["template"].replace(" {summary}", "")
    assert prompt["completion"] == " {summary}<|endoftext|>"
    assert json.loads((run / "adapter" / "prompt.json").read_text()) == prompt
    environment = json.loads((run / "environment.json").read_text())
    assert environment["packages"]["torch"] == torch.__version__
    assert len(environment["git"]["commit"]) == 40
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
            if "train/loss" in line] == [1, 2, 3]
    # The adapter is plain PEFT format on top of the (cached) base weights.
    from summ.sources import random_folder
    base = AutoModelForCausalLM.from_pretrained(random_folder(cfg.model, torch.float32, cfg.train.seed))
    model = PeftModel.from_pretrained(base, run / "adapter")
    trained = {k for k in model.state_dict() if "lora_B" in k}
    assert len(trained) == 8 and all(model.state_dict()[k].abs().sum() > 0 for k in trained)
    assert (run / "adapter" / "tokenizer_config.json").is_file()
    assert result.run_dir == run


def test_mlflow_and_tensorboard_get_the_curves_and_hyperparameters_of_log_jsonl(tmp_path, monkeypatch):
    """log.trackers through Accelerate's trackers, MLflow offline in a local file store."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in to a local file store
    cfg = tiny_config(tmp_path / "run", log={"trackers": ["mlflow", "tensorboard"]}, eval={"at_start": True})
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("summ").experiment_id])
    assert run.info.run_name == "run"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    for key in ("val/loss", "train/loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(x["step"], pytest.approx(x[key], rel=1e-6)) for x in logged if key in x]
    assert len(list((tmp_path / "run").glob("tensorboard/events.out.tfevents.*"))) == 1


def test_a_tracker_without_its_package_is_refused_before_the_run_folder(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tiny_config(tmp_path / "run", log={"trackers": ["wandb"]})
    with pytest.raises(ConfigError, match=r"^log\.trackers: 'wandb' needs the wandb package "
                                          r"\(pip install -e '\.\[wandb\]'\)$"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, train={"save_every": 1})
    train(cfg)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg)


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
os.environ["SUMM_CACHE"] = {cache!r}
import conftest, summ.training as tr
real_rename = os.rename
def rename(src, dst):
    if str(dst).endswith("step-0000004"):   # die half-way through saving checkpoint 4
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
os.rename = rename  # summ.files renames the finished checkpoint folder into place
cfg = conftest.tiny_config({out!r}, **{sections!r})
tr.train(cfg)
"""


def test_killed_run_resumes_with_identical_losses(tmp_path):
    # Dropout on, so the resumed run is only identical if the RNG state is restored too; two epochs,
    # so resuming crosses an epoch boundary; 8-bit AdamW state goes through weights_only loading.
    sections = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                "train": {"epochs": 2, "save_every": 2, "keep_last": 5, "optimizer": "adamw_8bit",
                          "lr_scheduler": "cosine", "warmup_steps": 2}}
    full = train(tiny_config(tmp_path / "full", **sections))
    assert full.steps == 6

    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), cache=os.environ["SUMM_CACHE"],
                                out=str(killed), sections=sections)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(killed).name == "step-0000002"  # the half-written step 4 is not used
    assert (killed / "checkpoints" / ".tmp-step-0000004").is_dir()

    resumed = train(tiny_config(killed, **sections), resume=True)
    assert resumed.steps == 6
    torch.testing.assert_close(resumed.train_losses, full.train_losses, rtol=1e-6, atol=0)
    assert resumed.metrics["final_val_loss"] == pytest.approx(full.metrics["final_val_loss"], rel=1e-6)
    assert not (killed / "checkpoints" / ".tmp-step-0000004").exists()


SIGNAL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
os.environ["SUMM_CACHE"] = {cache!r}
import conftest, run, summ.training as tr
import summ.speed.step as step_module
real_queue, calls = step_module.queue_gradients, []
def queue_gradients(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # a scheduler's SIGTERM arrives during step 3's forward and backward
        os.kill(os.getpid(), signal.{signal})
    return real_queue(*args, **kwargs)
step_module.queue_gradients = queue_gradients
conftest.tiny_config({out!r}, **{sections!r}).save({config!r})
sys.exit(run.main(["--config", {config!r}]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_checkpoints_the_step_and_the_resume_is_exact(tmp_path, name, code):
    """Preemption loses nothing: the step in progress ends, is checkpointed (save_every is not due),
    the run exits 128 + the signal with the command that continues it, and the resumed run's losses
    are an uninterrupted run's."""
    sections = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                "train": {"epochs": 2, "save_every": 100, "keep_last": 2, "optimizer": "adamw_8bit",
                          "lr_scheduler": "cosine", "warmup_steps": 2}}
    full = train(tiny_config(tmp_path / "full", **sections))

    stopped, config = tmp_path / "stopped", tmp_path / "stopped.json"
    script = SIGNAL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), cache=os.environ["SUMM_CACHE"],
                                  out=str(stopped), sections=sections, config=str(config), signal=name)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert f"{name}: finishing this optimizer step, then saving a checkpoint and stopping" in proc.stderr
    assert (f"stopped: {name}: stopped after step 3; checkpoint {stopped / 'checkpoints' / 'step-0000003'}; "
            f"continue with: python run.py --config {config} --resume") in proc.stderr
    assert [c.name for c in (stopped / "checkpoints").iterdir()] == ["step-0000003"]

    resumed = train(tiny_config(stopped, **sections), resume=True)
    assert resumed.steps == full.steps == 6
    torch.testing.assert_close(resumed.train_losses, full.train_losses, rtol=1e-6, atol=0)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real = step_module.forward_summed_loss
    calls = {"n": 0}

    def poisoned_on(bad_calls):
        def loss(model, batch, device=None):
            calls["n"] += 1
            value = real(model, batch, device)
            return value * float("nan") if calls["n"] in bad_calls else value
        return loss

    # One bad micro-batch (on a CPU a step is one micro-batch): its step is skipped, counted, and the run goes on.
    monkeypatch.setattr(step_module, "forward_summed_loss", poisoned_on({2}))
    bnb_8bit = {"save_every": 3, "optimizer": "adamw_8bit"}
    result = train(tiny_config(tmp_path / "one", eval={"at_end": False}, log={"log_every": 3}, train=bnb_8bit))
    assert result.metrics["skipped_steps"] == 1 and result.steps == 3
    assert math.isnan(result.train_losses[1]) and all(math.isfinite(x) for x in result.train_losses[::2])
    lines = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    logged = {x["step"]: x for x in lines if "train/loss" in x}
    # The logged loss is the mean of the steps that ran, not NaN.
    assert list(logged) == [3] and logged[3]["train/skipped_steps"] == 1
    assert logged[3]["train/loss"] == pytest.approx((result.train_losses[0] + result.train_losses[2]) / 2, rel=1e-12)

    # Every step bad from step 2 on: stop at step 3, the second bad one in a row. A skipped step
    # applies no update, so the checkpoint written after step 2 still holds finite step-1 weights.
    calls["n"] = 0
    monkeypatch.setattr(step_module, "forward_summed_loss", poisoned_on(set(range(2, 100))))
    cfg = tiny_config(tmp_path / "many", train={"epochs": 3, "save_every": 1, "max_consecutive_bad_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row .*\(step 3\).*step-0000002"):
        train(cfg)
    last = latest_checkpoint(tmp_path / "many")
    assert last.name == "step-0000002"
    weights = load_file(last / "adapter" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_cli_reports_config_errors_before_loading_anything(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import run

    code = run.main(["--config", str(REPO / "configs" / "xsum.json"), "--set", "train.lr=-1"])
    assert code == 2 and "'train.lr' must be > 0" in capsys.readouterr().err


def test_only_right_padded_batches_drop_their_padding_mask():
    from summ.loss import is_right_padded

    assert is_right_padded(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])) is True
    # Left padding (generation) or a hole: real tokens would attend to pads without the mask.
    assert not is_right_padded(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert not is_right_padded(torch.tensor([[1, 0, 1, 1]]))


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_a_cpu_uses_bf16_only_where_it_is_fast(monkeypatch, native_bf16, expected):
    import summ.precision as precision

    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: native_bf16)
    assert precision.mixed_precision_mode("auto") == expected
    assert precision.mixed_precision_mode("fp16") == "fp16"
    assert precision.resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_learning_rate_that_blows_the_weights_up_stops_at_the_next_validation(tmp_path):
    """lr 1e30 keeps every loss and gradient finite until the weights overflow: the validation after
    the first step sees NaN and ends the run before that state is checkpointed or saved as adapter."""
    cfg = tiny_config(tmp_path / "run", train={"lr": 1e30, "save_every": 1},
                      eval={"eval_every": 1, "at_start": False})
    with pytest.raises(TrainingDiverged, match=r"^validation loss is nan at step 1; stopping before this state is "
                                               r"saved\. Last good checkpoint: none yet\. Try a lower train\.lr "
                                               r"\(now 1e\+30\)$"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run") is None
    assert not (tmp_path / "run" / "adapter").exists()


def test_keep_best_leaves_the_lowest_validation_loss_in_adapter(tmp_path, monkeypatch):
    """train.keep_best: validation losses 3.0, 2.5, 2.8, 2.9 at steps 0-3; adapter/ is step 1's state
    (the checkpoint of that step holds the same weights), the last state stays in checkpoints/."""
    import summ.training as tr

    losses = iter([3.0, 2.5, 2.8, 2.9])
    monkeypatch.setattr(tr, "evaluate_loss", lambda *args, **kwargs: next(losses))
    cfg = tiny_config(tmp_path / "run", train={"save_every": 1, "keep_last": 5, "keep_best": True},
                      eval={"eval_every": 1, "at_start": True, "generate": False})
    result = train(cfg)
    run = tmp_path / "run"
    assert result.steps == 3 and result.metrics["adapter_step"] == 1
    best = load_file(run / "adapter" / "adapter_model.safetensors")
    for step, same in ((1, True), (3, False)):
        saved = load_file(run / "checkpoints" / f"step-{step:07d}" / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(best[k], saved[k]) for k in best) is same
