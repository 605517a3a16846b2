"""Bad input and faults: a one-line error before anything is created, nothing lost, resumes that
refuse what they cannot honour, and a run that survives a non-finite fp16 step or a full disk."""

import dataclasses
import errno
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from summ.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from summ.run_record import ResumeMismatch
import summ.speed.step as step_module
from summ.speed.step import OutOfMemory
from summ.training import TrainingDiverged, TrainingError, train
from tests.conftest import FIXTURES, tiny_config

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO))
import run  # noqa: E402

GOOD_ROW = {"id": "g", "document": "The council approved the plan on Monday. " * 4, "summary": "Plan approved."}


def write_config(tmp_path, **sections) -> Path:
    path = tmp_path / "config.json"
    tiny_config(tmp_path / "run", **sections).save(path)
    return path


def data_folder(tmp_path, train_bytes: bytes, name: str = "train.jsonl") -> Path:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(train_bytes)
    (folder / "validation.jsonl").write_bytes((FIXTURES / "xsum_tiny" / "validation.jsonl").read_bytes())
    return folder


def jsonl(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# Each case: --set overrides (a callable of tmp_path for paths), the message, the exit status.
BAD_INPUTS = {
    "lr inf": (["train.lr=inf"], "--set train.lr=inf: 'train.lr' must be a finite number, got inf"),
    "lr nan": (["train.lr=nan"], "--set train.lr=nan: 'train.lr' must be a finite number, got nan"),
    "lr zero": (["train.lr=0"], "--set train.lr=0: 'train.lr' must be > 0, got 0.0"),
    "dropout 1": (["lora.dropout=1"], "--set lora.dropout=1: 'lora.dropout' must be in [0, 1), got 1.0"),
    "zero batch": (["train.micro_batch_size=0"],
                   "--set train.micro_batch_size=0: 'train.micro_batch_size' must be > 0"),
    "word for int": (["train.epochs=two"], "--set train.epochs=two: cannot read 'two' as an integer"),
    "unknown key": (["train.learning_rate=1"], "--set train.learning_rate=1: unknown key 'train.learning_rate'"),
    "bad share": (["data.max_bad_row_share=2"], "'data.max_bad_row_share' must be in [0, 1], got 2.0"),
    "missing relative dataset": (["data.dataset=./no/such/folder"],
                                 "--set data.dataset=./no/such/folder: 'data.dataset' must be an existing folder or a "
                                 "hub id; {cwd}/no/such/folder does not exist"),
    "missing relative model": (["model.name_or_path=models/phi-2"],
                               "'model.name_or_path' must be an existing folder or a hub id; {cwd}/models/phi-2 does "
                               "not exist"),
    "template without article": (["data.template=Summary: {summary}"],
                                 "'data.template' must be a string with {article} once and ending with {summary}"),
    "min article too long": (["data.min_article_tokens=120"],
                             "data.min_article_tokens=120 does not fit data.max_length=128"),
    "resume-changed alone": (["--resume-changed"], "--resume-changed: only applies with --resume"),
    "no bootstrap": (["eval.bootstrap_resamples=0"],
                     "--set eval.bootstrap_resamples=0: 'eval.bootstrap_resamples' must be > 0, got 0"),
    "empty output dir": (["log.output_dir="], "--set log.output_dir=: 'log.output_dir' must be a folder path"),
    "unknown lora target": (["lora.target_modules=q_proj,nope_proj"],
                            "error: lora.target_modules: nope_proj matches no module of this phi model; its linear layers are "
                            "dense, fc1, fc2, k_proj, lm_head, q_proj, v_proj"),
    "liger on phi": (["model.liger_kernel=true"],
                     "error: model.liger_kernel: Liger-Kernel has no kernels for phi models (it patches llama, mistral, "
                     "qwen2); set it to false"),
    "zero micro-batch tokens": (["train.micro_batch_tokens=0"],
                                "--set train.micro_batch_tokens=0: 'train.micro_batch_tokens' must be > 0 or null, got 0"),
    "packing with flash attention": (["train.packing=true", "model.attn_implementation=flash_attention_2"],
                                     "error: train.packing: packed rows keep attention inside each example with "
                                     "model.attn_implementation 'sdpa' or 'eager', not 'flash_attention_2'"),
    "flash attention missing": (["model.attn_implementation=flash_attention_2"],
                                "error: model.attn_implementation: 'flash_attention_2' needs the flash-attn package "
                                "(pip install flash-attn); 'sdpa' needs nothing"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_values_fail_in_one_line_before_anything_is_created(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so "models/phi-2" reads as a local path, not a hub id
    items, message = BAD_INPUTS[case]
    config = write_config(tmp_path)
    argv = ["--config", str(config)]
    for item in items:
        argv += [item] if item.startswith("--") else ["--set", item]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{cwd}", str(tmp_path)) in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()


BAD_FILES = {
    "empty jsonl": (b"", "train.jsonl", "{data}/train.jsonl: empty file"),
    "blank jsonl": (b"\n \n", "train.jsonl", "{data}/train.jsonl: no rows"),
    "binary jsonl": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "train.jsonl",
                     "{data}/train.jsonl: binary file; expected UTF-8 text (jsonl)"),
    "header-only csv": (b"id,document,summary\n", "train.csv", "{data}/train.csv: no rows"),
    "wrong field everywhere": (jsonl(*[{"id": str(i), "text": "a", "summary": "b"} for i in range(5)]), "train.jsonl",
                               "{data}/train.jsonl: data.article_field='document' is not a column"),
    "mostly bad rows": (jsonl(GOOD_ROW, *[{"id": str(i), "document": "", "summary": "b"} for i in range(4)]),
                        "train.jsonl", "{data}/train.jsonl: 4 of 5 rows are unusable"),
    "every line undecodable": (b"\xff\xfe{}\n" * 3, "train.jsonl", "{data}/train.jsonl: no usable rows (read 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_files_fail_in_one_line_before_anything_is_created(tmp_path, capsys, case):
    content, name, message = BAD_FILES[case]
    data = data_folder(tmp_path, content, name)
    config = write_config(tmp_path, data={"dataset": str(data)})
    assert run.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message.replace("{data}", str(data)) in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"model": {"name_or_path": "caf\xe9"}}'.encode("latin-1"))
    assert run.main(["--config", str(bad)]) == 2
    assert f"error: {bad}: not UTF-8 text (byte 0xe9 at offset 31)" in capsys.readouterr().err
    in_file = write_config(tmp_path)
    raw = json.loads(in_file.read_text())
    raw["train"]["lr"] = -1.0
    in_file.write_text(json.dumps(raw))
    assert run.main(["--config", str(in_file)]) == 2
    assert f"error: {in_file}: 'train.lr' must be > 0, got -1.0" in capsys.readouterr().err


def test_rows_are_skipped_counted_and_none_lost(tmp_path):
    """A file with a BOM, an undecodable line, a missing field, an empty summary and a huge article:
    every good row is trained on, every bad one is reported with its line."""
    good = [dict(GOOD_ROW, id=f"g{i}") for i in range(16)]
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(3, json.dumps({"id": "bad-bytes", "document": "x", "summary": "y"}).encode().replace(b"x", b"\xff"))
    lines.insert(7, json.dumps({"id": "no-summary", "document": "text"}).encode())
    lines.insert(9, json.dumps({"id": "empty-summary", "document": "text", "summary": " "}).encode())
    lines.append(json.dumps({"id": "huge", "document": "word " * 50_000, "summary": "Short."}).encode())
    data = data_folder(tmp_path, b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    cfg = tiny_config(tmp_path / "run", data={"dataset": str(data), "max_bad_row_share": 0.2},
                      train={"max_steps": 1}, eval={"at_end": False})
    result = train(cfg)
    summary = result.metrics["data"]["train"]
    path = data / "train.jsonl"
    assert (summary["read"], summary["used"], summary["skipped"]) == (20, 17, 3)
    assert summary["first_skipped"] == [f"{path}:4: not UTF-8 text", f"{path}:8: missing summary field 'summary'",
                                        f"{path}:10: empty summary field 'summary'"]


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint after every step; tests copy it before resuming."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(root / "run", train={"save_every": 1, "keep_last": 5}, eval={"at_end": False},
                      log={"trackers": ["tensorboard"]})
    result = train(cfg)
    return root / "run", result


def copy_run(finished_run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def resume_from_step_1(run_dir, accept_changes=False, **sections):
    cfg = tiny_config(run_dir, train={"save_every": 1, "keep_last": 5, **sections.pop("train", {})},
                      eval={"at_end": False, **sections.pop("eval", {})},
                      log={"trackers": ["tensorboard"], **sections.pop("log", {})}, **sections)
    return train(cfg, resume=run_dir / "checkpoints" / "step-0000001", accept_changes=accept_changes)


def test_resume_that_changes_the_math_is_refused_with_each_difference(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = (run_dir / "config.json").read_text()
    with pytest.raises(ResumeMismatch, match=re.escape(
            "cannot resume exactly, changed since the checkpoint: train.lr: 0.001 -> 0.002; train.seed: 0 -> 1. "
            "Restore them, or pass --resume-changed")):
        resume_from_step_1(run_dir, train={"lr": 2e-3, "seed": 1})
    assert (run_dir / "config.json").read_text() == before


def test_resume_that_changes_tensor_shapes_is_refused_even_when_forced(finished_run, tmp_path, monkeypatch):
    """LoRA rank 4 -> 8: the checkpoint's matrices cannot load; refused in one line naming the key,
    before any model loads, with --resume-changed too."""
    import summ.training as tr

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tr, "setup_model", refuse)
    run_dir = copy_run(finished_run, tmp_path)
    for forced in (False, True):
        with pytest.raises(ResumeMismatch) as caught:
            resume_from_step_1(run_dir, accept_changes=forced, lora={"r": 8, "alpha": 16})
        assert str(caught.value) == (
            f"{run_dir / 'checkpoints' / 'step-0000001'}: cannot resume, even with --resume-changed: lora.r: 4 -> 8 "
            f"changes the shapes of the saved weights or optimizer state. Restore the value, or start a new run "
            f"in another log.output_dir")


def test_resume_with_other_training_data_is_refused(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    rows = (FIXTURES / "xsum_tiny" / "train.jsonl").read_text().splitlines()
    data = data_folder(tmp_path, ("\n".join(rows[1:] + rows[:1]) + "\n").encode())  # same rows, other order
    with pytest.raises(ResumeMismatch, match=r"tokenized training rows \(data, template, tokenizer or max_length; rows:hash\): 12:\w+ -> 12:\w+"):
        resume_from_step_1(run_dir, data={"dataset": str(data)})


def test_resume_allows_evaluation_and_logging_changes_and_logs_each_step_once(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    resumed = resume_from_step_1(run_dir, eval={"batch_size": 2}, log={"log_every": 1})
    torch.testing.assert_close(resumed.train_losses, finished_run[1].train_losses, rtol=1e-6, atol=0)
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # TensorBoard: the resumed writer purges what the killed one logged after step 1.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    logged = [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")]
    assert logged == [(step, round(loss, 4)) for step, loss in zip((1, 2, 3), resumed.train_losses)]
    record = json.loads((run_dir / "resumes.jsonl").read_text())
    assert record["changed"] == {"eval.batch_size": [4, 2], "log.output_dir": [str(finished_run[0]), str(run_dir)]}
    assert record["forced"] is False


def test_resume_changed_accepts_and_records_instead_of_overwriting(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = (run_dir / "config.json").read_text()
    resumed = resume_from_step_1(run_dir, accept_changes=True, train={"lr": 2e-3})
    # Step 2's loss is measured before its update, on step 1's weights; step 3 sees the new lr's update.
    assert resumed.steps == 3 and resumed.train_losses[:2] == finished_run[1].train_losses[:2]
    assert abs(resumed.train_losses[2] - finished_run[1].train_losses[2]) > 1e-4
    record = json.loads((run_dir / "resumes.jsonl").read_text())
    assert record["changed"] == {"log.output_dir": [str(finished_run[0]), str(run_dir)], "train.lr": [0.001, 0.002]}
    assert record["forced"] is True
    assert record["config"]["train"]["lr"] == 0.002
    assert (run_dir / "config.json").read_text() == before


def test_cli_resume_mismatch_is_a_one_line_error(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    config = tmp_path / "config.json"
    tiny_config(run_dir, train={"save_every": 1, "keep_last": 5}, eval={"at_end": False},
                log={"trackers": ["tensorboard"]}).save(config)
    assert run.main(["--config", str(config), "--set", "train.weight_decay=0.1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed since the checkpoint: train.weight_decay: 0.0 -> 0.1" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- faults


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradients overflow, as in fp16."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def fp16_accelerator_on_cpu(cfg, run_dir):
    """accelerate keeps fp16 loss scaling for GPUs; give a CPU accelerator the same GradScaler path."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.state._mixed_precision = "fp16"
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def test_fp16_overflow_steps_are_skipped_counted_and_the_scaler_updated(tmp_path, monkeypatch):
    import summ.training as tr

    real, calls = step_module.forward_summed_loss, {"n": 0}

    def overflowing(model, batch, device=None):
        calls["n"] += 1
        value = real(model, batch, device)
        return InfiniteGradient.apply(value) if calls["n"] in bad else value

    monkeypatch.setattr(tr, "make_accelerator", fp16_accelerator_on_cpu)
    monkeypatch.setattr(step_module, "forward_summed_loss", overflowing)
    scales = []
    real_step = tr.optimizer_step

    def recording_step(accelerator, *args):
        applied = real_step(accelerator, *args)
        scales.append(accelerator.scaler.get_scale())
        return applied

    monkeypatch.setattr(tr, "optimizer_step", recording_step)

    # Step 2's window (micro-batches 3 and 4, run as stated) overflows: skipped, scale halved, the run goes on.
    bad = {3}
    result = train(tiny_config(tmp_path / "one", eval={"at_end": False}, train={"auto_micro_batch": False}))
    assert result.steps == 3 and result.metrics["skipped_steps"] == 1 and result.metrics["overflow_steps"] == 1
    assert scales == [1024.0, 512.0, 512.0]
    lines = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "train/skipped_step" in x]
    assert [x["step"] for x in skipped] == [2] and not math.isfinite(skipped[0]["train/grad_norm_this_step"])

    # Every window from step 2 on overflows: two in a row stop the run; the checkpoint of step 1 is intact.
    calls["n"], bad, scales[:] = 0, set(range(3, 100)), []
    cfg = tiny_config(tmp_path / "many", train={"epochs": 2, "save_every": 1, "max_consecutive_bad_steps": 2,
                                                "auto_micro_batch": False})
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row .*\(step 3\).*step-0000002"):
        train(cfg)
    assert scales == [1024.0, 512.0, 256.0]
    weights = load_file(latest_checkpoint(tmp_path / "many") / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 16 and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("failure, reason, advice", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device", "free space"),
    (OSError(errno.EACCES, "Permission denied"), "Permission denied", "make the run folder writable"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error", "fix the cause above"),
    # What torch.save raises when the disk fills under its zip writer.
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
     "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0",
     "check the free space and that the run folder is writable"),
])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure, reason, advice):
    import summ.checkpoint as ck

    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        if ".tmp-step-0000002" in str(file) and str(file).endswith("optimizer.pt"):
            raise failure
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", save)
    cfg = tiny_config(tmp_path / "run", train={"save_every": 1}, eval={"at_end": False})
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint at step 2 not written: could not write {tmp_path}/run/checkpoints/step-0000002: {reason}; "
            f"nothing was written there. The last complete checkpoint, {tmp_path}/run/checkpoints/"
            f"step-0000001, is intact; {advice} and continue with --resume") + "$"):
        train(cfg)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]

    monkeypatch.setattr(ck.torch, "save", real_save)
    resumed = train(cfg, resume=True)
    assert resumed.steps == 3 and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002",
                                                                                           "step-0000003"]


def test_out_of_memory_names_the_micro_batch_and_the_knobs(tmp_path, monkeypatch):
    import summ.training as tr

    def oom(model, batch, device=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_module, "forward_summed_loss", oom)
    cfg = tiny_config(tmp_path / "run", train={"micro_batch_tokens": 256}, eval={"at_end": False})
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory on a micro-batch of \d+ rows x \d+ tokens \(\d+ "
                                            r"tokens\); set train.micro_batch_tokens below 256 \(the rows per step "
                                            r"stay the same\), lower data.max_length, or recompute more layers "
                                            r"\(now 0 of 2: model.gradient_checkpointing=true, "
                                            r"model.checkpointed_layers=N\)$"):
        train(cfg)
    # Every layer recomputing already: the hint stops at the knobs that are left.
    cfg = tiny_config(tmp_path / "run2", model={"gradient_checkpointing": True}, train={"micro_batch_tokens": 256},
                      eval={"at_end": False})
    with pytest.raises(OutOfMemory, match=r"\(the rows per step stay the same\), or lower data.max_length$"):
        train(cfg)


def test_out_of_memory_in_validation_names_the_evaluation_batch(tmp_path, monkeypatch):
    import summ.training as tr

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr, "evaluate_loss", oom)
    cfg = tiny_config(tmp_path / "run", eval={"batch_size": 4})
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory in validation at eval\.batch_size=4 rows of up to "
                                            r"data\.max_length=128 tokens; lower eval\.batch_size$"):
        train(cfg)


def test_a_checkpoint_holding_code_is_refused_without_unsafe_advice(finished_run, tmp_path):
    import os

    run_dir = copy_run(finished_run, tmp_path)
    evil = run_dir / "checkpoints" / "step-0000001" / "scheduler.pt"
    torch.save({"x": os.system}, evil)  # a pickled function: loading it would hand a callable to the code
    with pytest.raises(CheckpointError) as caught:
        resume_from_step_1(run_dir)
    message = str(caught.value)
    assert message.startswith(f"{evil}: refused to load: it holds Python objects other than tensors")
    assert "(unsupported GLOBAL posix.system)" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_resume_into_a_new_folder_gives_it_a_complete_record(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "continued"
    cfg = tiny_config(elsewhere, train={"save_every": 1, "keep_last": 5}, eval={"at_end": False},
                      log={"trackers": ["tensorboard"]})
    train(cfg, resume=run_dir / "checkpoints" / "step-0000002")
    assert sorted(p.name for p in elsewhere.iterdir() if p.suffix in (".json", ".jsonl")) == [
        "config.json", "environment.json", "log.jsonl", "metrics.json", "prompt.json", "resumes.jsonl"]
    assert json.loads((elsewhere / "config.json").read_text())["log"]["output_dir"] == str(elsewhere)
    assert json.loads((elsewhere / "resumes.jsonl").read_text())["step"] == 2


def test_a_fresh_run_keeps_an_earlier_attempts_log_beside_its_own(tmp_path, monkeypatch):
    import summ.training as tr

    def crash(*args, **kwargs):
        raise TrainingError("stopped before the first checkpoint")

    cfg = tiny_config(tmp_path / "run", eval={"at_end": False})
    real = tr.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", crash)
    with pytest.raises(TrainingError, match="stopped before the first checkpoint"):
        train(cfg)
    monkeypatch.setattr(tr, "save_checkpoint", real)
    train(cfg)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    (earlier,) = (tmp_path / "run").glob("log.before-*.jsonl")
    assert [json.loads(x)["step"] for x in earlier.read_text().splitlines()] == [1, 2, 3]


def test_full_disk_while_logging_is_a_clear_error_with_the_checkpoint_kept(tmp_path, monkeypatch):
    import builtins

    import summ.run_record as rr
    from summ.files import WriteError

    appends = {"n": 0}

    def open_filling_up(file, mode="r", *args, **kwargs):
        if mode == "a" and str(file).endswith("log.jsonl"):
            appends["n"] += 1
            if appends["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(rr, "open", open_filling_up, raising=False)
    cfg = tiny_config(tmp_path / "run", train={"save_every": 1}, eval={"at_start": False, "at_end": False},
                      log={"log_every": 1})
    with pytest.raises(WriteError, match=re.escape(f"could not append to {tmp_path}/run/log.jsonl: "
                                                   f"No space left on device")):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000001", "step-0000002"]


def test_an_old_checkpoint_that_cannot_be_removed_is_named_and_left(tmp_path, monkeypatch, caplog):
    import summ.checkpoint as ck

    real_rmtree = ck.shutil.rmtree

    def refuse_first(path, *args, **kwargs):
        if Path(path).name == "step-0000001":
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", refuse_first)
    cfg = tiny_config(tmp_path / "run", train={"save_every": 1, "keep_last": 1}, eval={"at_end": False})
    with caplog.at_level("WARNING", logger="summ.checkpoint"):
        result = train(cfg)
    assert result.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000001", "step-0000003"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "summ.checkpoint"]
    assert warnings[0].startswith(f"could not remove the old checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000001'}"
                                  f" ([Errno 13] Permission denied")
    assert warnings[0].endswith("training goes on, remove it by hand")


def test_a_checkpoint_from_before_a_key_existed_resumes_unless_its_plan_changed_meaning(tmp_path):
    """A resume record written before keys such as train.auto_micro_batch existed compares those keys
    as their defaults, and one holding settings summ no longer has resumes where they held today's
    behaviour; one whose micro_batch_tokens grouped the data plan by tokens (its old meaning) is
    refused, since the remaining steps would hold other rows."""
    import json as _json

    from summ.checkpoint import RESUME_RECORD
    from summ.run_record import ResumeMismatch

    cfg = tiny_config(tmp_path / "run", train={"save_every": 1, "max_steps": 1}, eval={"at_end": False})
    train(cfg)
    record_file = latest_checkpoint(tmp_path / "run") / RESUME_RECORD
    record = _json.loads(record_file.read_text())
    for section, key in (("train", "auto_micro_batch"), ("train", "packing"), ("model", "compile_layers")):
        del record["config"][section][key]
    # Settings summ no longer has, at the values that give today's behaviour.
    record["config"]["train"].update(graph_length_multiple=16, shuffle=True)
    record["config"]["model"].update(compile_options={"fallback_random": True}, embeddings_on_cpu=False)
    record_file.write_text(_json.dumps(record))
    assert train(cfg, resume=True).steps == 1
    longer = tiny_config(tmp_path / "run", train={"save_every": 1, "max_steps": 2}, eval={"at_end": False})
    with pytest.raises(ResumeMismatch) as refused:
        train(longer, resume=True)
    # Only what really changed is named: the step budget, not the keys the record lacks.
    assert "train.max_steps: 1 -> 2" in str(refused.value)
    assert "auto_micro_batch" not in str(refused.value) and "compile_layers" not in str(refused.value)
    assert "graph_length_multiple" not in str(refused.value)

    # A retired setting that did something today's summ does not do is refused; one that acted only
    # under a key that is off, or matches what today's summ does for this config, is not.
    from summ.run_record import check_resume

    def changed(config):
        record_file.write_text(_json.dumps(record))
        return check_resume(config, record_file.parent, record["world_size"], record["data_fingerprint"], False)

    record["config"]["train"]["graph_length_multiple"] = 64
    assert changed(cfg)["changed"] == {}  # graph lengths without graphs
    record["config"]["train"]["cuda_graphs"] = True
    graphed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graphs=True))
    with pytest.raises(ResumeMismatch, match=r"train\.graph_length_multiple: 64 is no longer a setting \(CUDA graph "
                                             r"lengths are multiples of 16 tokens\)"):
        changed(graphed)
    record["config"]["train"].update(graph_length_multiple=16, cuda_graphs=False)
    record["config"]["model"]["compile_layers"] = True
    compiled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile_layers=True))
    # Compiled layers without graphs draw inductor's dropout today: torch's, as recorded, would not resume exactly.
    with pytest.raises(ResumeMismatch, match=r"model\.compile_options: \{'fallback_random': True\} is no longer a "
                                             r"setting"):
        changed(compiled)
    record["config"]["model"]["compile_options"] = {}
    assert changed(compiled)["changed"] == {}
    del record["config"]["model"]["compile_layers"]

    record["config"]["train"]["micro_batch_tokens"] = 256
    record_file.write_text(_json.dumps(record))
    with pytest.raises(ResumeMismatch, match=r"train\.micro_batch_tokens: when this checkpoint was written it grouped "
                                             r"the data plan by tokens; now it only splits each step's rows"):
        train(tiny_config(tmp_path / "run", train={"save_every": 1, "max_steps": 1, "micro_batch_tokens": 256},
                          eval={"at_end": False}), resume=True)


HOLD = ("import sys, time\nfrom summ.run_lock import hold_run_folder\nhold_run_folder(sys.argv[1], 'training')\n"
        "print('held', flush=True)\ntime.sleep(120)")


def test_a_second_writer_of_a_run_folder_is_refused_until_the_first_ends(tmp_path):
    """One run per folder: while another process trains into log.output_dir, training, evaluating or
    scoring LEAD there is refused in one line naming it; once it dies the OS frees the folder."""
    import subprocess

    from summ.lead import evaluate_lead
    from summ.run_lock import RunFolderBusy

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    cfg = tiny_config(folder)
    try:
        assert holder.stdout.readline() == "held\n"
        busy = (rf"^{re.escape(str(folder.resolve()))}: in use by training pid {holder.pid} started [0-9-]+ [0-9:]+ "
                rf".* \(`-c {re.escape(str(folder))}`\); wait for it to end or write elsewhere "
                r"\(--set log.output_dir=\.\.\.\); {} refused$")
        with pytest.raises(RunFolderBusy, match=busy.format("training")):
            train(cfg)
        with pytest.raises(RunFolderBusy, match=busy.format("LEAD baseline")):
            evaluate_lead(cfg, folder)
        assert [p.name for p in folder.iterdir()] == [".summ.lock"]  # nothing of either was written
    finally:
        holder.kill()
        holder.wait()
    train(cfg)
    assert (folder / "adapter").is_dir() and (folder / "metrics.json").is_file()


EVALUATE = ("import sys, time\nfrom summ.run_lock import hold_run_output\n"
            "hold_run_output(sys.argv[1], 'eval', 'evaluation')\nprint('held', flush=True)\ntime.sleep(120)")


def test_evaluations_of_one_run_share_it_and_each_takes_its_own_subfolder(tmp_path):
    """While another process evaluates a run into eval/, LEAD (lead/) scores beside it; a second
    evaluation into eval/ and training into the run are refused, naming that evaluation."""
    import subprocess

    from summ.lead import evaluate_lead
    from summ.run_lock import RunFolderBusy, hold_run_output

    folder = tmp_path / "run"
    cfg = tiny_config(folder)
    evaluation = subprocess.Popen([sys.executable, "-c", EVALUATE, str(folder)], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO)
    try:
        assert evaluation.stdout.readline() == "held\n"
        evaluate_lead(cfg, folder)
        assert (folder / "lead" / "eval_metrics.json").is_file()
        holder = rf"in use by evaluation pid {evaluation.pid} started [0-9-]+ [0-9:]+ .* \(`-c {re.escape(str(folder))}`\)"
        with pytest.raises(RunFolderBusy, match=rf"^{re.escape(str((folder / 'eval').resolve()))}: {holder}; .* "
                                                r"evaluation refused$"):
            hold_run_output(folder, "eval", "evaluation")
        with pytest.raises(RunFolderBusy, match=rf"^{re.escape(str(folder.resolve()))}: {holder}; .* training refused$"):
            train(cfg)
    finally:
        evaluation.kill()
        evaluation.wait()
    train(cfg)  # the evaluation ended: the folder is free, and this process keeps what it held
    assert (folder / "adapter").is_dir()


def test_ctrl_c_outside_training_is_one_line_and_exit_130(finished_run, tmp_path, monkeypatch, capsys):
    import summ.lead

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(summ.lead, "evaluate_lead", interrupted)
    run_dir = copy_run(finished_run, tmp_path)
    assert run.main(["eval", "--run", str(run_dir), "--baseline", "lead"]) == 130
    assert capsys.readouterr().err == "interrupted; files already written are complete\n"
