"""The run folder: what it records to reproduce and serve the run, and what a resume must match.

    config.json        the resolved config the run started with (never overwritten by a resume)
    prompt.json        the template and its exact split into prompt and completion
    environment.json   package versions, the git commit of summ, the command line
    resumes.jsonl      one line per resume: the checkpoint, what changed, whether it was forced
    log.jsonl          one line per logged step (training, validation, skipped steps)
    tensorboard/       the same curves for TensorBoard
    checkpoints/       step-NNNNNNN/ folders (adapter, optimizer, scheduler, RNG, train state)
    adapter/           the trained LoRA in PEFT format, with what plain transformers + peft need to run it
                       as predict does (summ.portable) and a model card (summ.model_card)
    metrics.json       the final figures of the run
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from summ.checkpoint import read_resume_record
from summ.config import RETIRED_KEYS, ConfigError, RunConfig, flat_config
from summ.files import WriteError, atomic_folder, write_atomic, write_json
from summ.model_card import refresh_model_card, write_model_card
from summ.portable import base_model_record, prompt_record, set_base_model, write_portable_files

log = logging.getLogger(__name__)

# Keys that change neither the updates nor the order of the training data: a resume may change them.
_HARMLESS_SECTIONS = ("eval", "log")
_HARMLESS_KEYS = {
    "train.save_every", "train.keep_last", "train.max_consecutive_bad_steps", "train.keep_best",
    "train.best_metric",
    "data.strict", "data.max_bad_row_share", "data.eval_split", "data.max_eval_rows",
    # Memory and speed only: recomputing activations gives the same numbers.
    "model.gradient_checkpointing", "model.checkpointed_layers",
    # How a step's rows are split into micro-batches: the same rows, the same gradient.
    "train.micro_batch_tokens", "train.auto_micro_batch", "train.packing",
}
# Keys that change the tensors a checkpoint holds (the adapter's matrices, the base model they attach
# to, the optimizer's state): no resume can load them, forced or not.
_SHAPE_KEYS = {"lora.r", "lora.target_modules", "model.name_or_path", "model.gguf_file", "model.config_overrides",
               "train.optimizer"}
_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors", "summ")


class ResumeMismatch(ConfigError):
    """A resume would not continue the checkpoint's run exactly."""


def is_harmless(key: str) -> bool:
    return key.split(".")[0] in _HARMLESS_SECTIONS or key in _HARMLESS_KEYS


# Retired keys that acted only when another key was on: inductor options on compiled layers, graph
# lengths under CUDA graphs.
_RETIRED_ONLY_WITH = {"model.compile_options": "model.compile_layers", "train.graph_length_multiple": "train.cuda_graphs"}


def retired_key_unchanged(key: str, value, old: dict, new: dict) -> bool:
    """Whether a retired key's recorded value gives what today's summ does for the new config."""
    gate = _RETIRED_ONLY_WITH.get(key)
    if gate is not None and not old.get(gate) and not new.get(gate):
        return True
    if key == "model.compile_options":  # today: torch's dropout kernel exactly when the layers run in graphs
        return value == ({"fallback_random": True} if new.get("train.cuda_graphs") else {})
    return value in RETIRED_KEYS[key][0]


def check_resume(cfg: RunConfig, checkpoint: Path | None, world_size: int, data_fingerprint: str,
                 accept_changes: bool) -> dict:
    """Compare this run with the checkpoint's; refuse a change of the math, the data or its order.

    Returns what changed ({} for a fresh run). Keys that only affect evaluation, logging or
    checkpoint cadence may change freely; anything else, a different number of processes or
    different training data is refused with each difference listed, unless `accept_changes`.
    """
    if checkpoint is None:
        return {}
    record = read_resume_record(checkpoint)
    if record is None:
        if not accept_changes:
            raise ResumeMismatch(f"{checkpoint}: this checkpoint does not record its run's config and data, so "
                                 f"an exact resume cannot be checked; pass --resume-changed to continue anyway")
        return {"changed": {}, "unchecked": True, "forced": True}
    new = flat_config(cfg.to_dict())
    # A key that the checkpoint's summ did not have yet compares as its default: what that version did.
    old = {**flat_config(RunConfig().to_dict()), **flat_config(record["config"])}
    old = {k: v for k, v in old.items() if k not in RETIRED_KEYS or not retired_key_unchanged(k, v, old, new)}
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    reshaped = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in _SHAPE_KEYS]
    if reshaped:
        raise ResumeMismatch(f"{checkpoint}: cannot resume, even with --resume-changed: {'; '.join(reshaped)} "
                             f"changes the shapes of the saved weights or optimizer state. Restore the value, or "
                             f"start a new run in another log.output_dir")
    refused = [f"{k}: {a!r} -> {b!r}" if k not in RETIRED_KEYS else
               f"{k}: {a!r} is no longer a setting ({RETIRED_KEYS[k][1]})"
               for k, (a, b) in changed.items() if not is_harmless(k)]
    if "auto_micro_batch" not in record["config"].get("train", {}) and \
            record["config"].get("train", {}).get("micro_batch_tokens") is not None:
        refused.append("train.micro_batch_tokens: when this checkpoint was written it grouped the data plan by tokens; "
                       "now it only splits each step's rows, so the remaining steps would hold other rows")
    if record["world_size"] != world_size:
        refused.append(f"processes: {record['world_size']} -> {world_size} (each reads its own share of the batches)")
    if record["data_fingerprint"] != data_fingerprint:
        refused.append(f"tokenized training rows (data, template, tokenizer or max_length; rows:hash): "
                       f"{record['data_fingerprint']} -> {data_fingerprint}")
    if refused and not accept_changes:
        raise ResumeMismatch(f"{checkpoint}: cannot resume exactly, changed since the checkpoint: "
                             f"{'; '.join(refused)}. Restore them, or pass --resume-changed to continue with the "
                             f"new values (recorded in resumes.jsonl)")
    allowed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if is_harmless(k)]
    if allowed:
        log.warning("resume: changed since the checkpoint (allowed): %s", "; ".join(allowed))
    if refused:
        log.warning("resume: changed since the checkpoint, accepted by --resume-changed: %s", "; ".join(refused))
    return {"changed": changed, "forced": bool(refused),
            "data_fingerprint": [record["data_fingerprint"], data_fingerprint],
            "world_size": [record["world_size"], world_size]}


def write_run_record(cfg: RunConfig, run_dir: Path, accelerator, tokenizer, resuming: bool) -> None:
    """config.json, prompt.json and environment.json of a fresh run, or of a resume into a folder that
    lacks them (a resume from another run's checkpoint); a resume never rewrites them, so config.json
    keeps saying what the run started with (changes go to resumes.jsonl, see `record_resume`)."""
    if not accelerator.is_main_process:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if resuming and (run_dir / "config.json").is_file():
        return
    cfg.save(run_dir / "config.json")
    write_json(run_dir / "prompt.json", prompt_record(cfg, tokenizer))
    write_json(run_dir / "environment.json", environment())


def record_resume(cfg: RunConfig, run_dir: Path, accelerator, checkpoint: Path, step: int, changes: dict) -> None:
    """One line of resumes.jsonl, written once the checkpoint has loaded."""
    if not accelerator.is_main_process:
        return
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(checkpoint), "step": step, **changes,
            "config": cfg.to_dict() if changes.get("forced") else None, "environment": environment()}
    with open(Path(run_dir) / "resumes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


def environment() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git": _git_commit(), "argv": sys.argv}


def _git_commit() -> dict | None:
    """The commit of the summ checkout that ran, and whether it had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


class RunLog:
    """log.jsonl and TensorBoard. A resumed run first drops what was logged after its checkpoint,
    so the steps a killed run repeats are not there twice."""

    def __init__(self, accelerator, cfg: RunConfig, run_dir: Path, resumed_at: int | None):
        self.accelerator = accelerator
        self.file = Path(run_dir) / "log.jsonl"
        if accelerator.is_main_process and self.file.is_file():
            if resumed_at is None:
                # A fresh run in a folder an earlier attempt left without a checkpoint: its log is
                # kept beside, not mixed into this one.
                self.file.rename(self.file.with_name(f"log.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            else:
                write_atomic(self.file, "".join(line + "\n" for line in self.file.read_text().splitlines()
                                                if _step_of(line) is not None and _step_of(line) <= resumed_at))
        self.trackers = start_trackers(cfg, Path(run_dir), resumed_at) if accelerator.is_main_process else []

    def write(self, step: int, values: dict) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)
        if self.accelerator.is_main_process:
            try:
                with open(self.file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **values}) + "\n")
            except OSError as e:  # a full disk: the run stops with its last checkpoint, not a traceback
                raise WriteError(f"could not append to {self.file}: {e.strerror or e}") from e


    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def check_trackers(cfg: RunConfig) -> None:
    """A tracker whose package is missing fails before the run folder is made."""
    for name, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in cfg.log.trackers and importlib.util.find_spec(package) is None:
            raise ConfigError(f"log.trackers: '{name}' needs the {package} package (pip install -e '.[{name}]')")


def start_trackers(cfg: RunConfig, run_dir: Path, resumed_at: int | None) -> list:
    """Accelerate's trackers named in log.trackers, started, holding the run's hyperparameters."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in cfg.log.trackers:
        if name == "tensorboard":
            # purge_step hides earlier events at and after it: those the resumed run writes again, or
            # all of an earlier attempt's for a fresh run.
            tracker = TensorBoardTracker("tensorboard", run_dir, purge_step=0 if resumed_at is None else resumed_at + 1)
        elif name == "mlflow":  # MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI and MLFLOW_RUN_ID apply
            tracker = MLflowTracker(experiment_name="summ", run_name=run_dir.name)
        else:  # WANDB_PROJECT, WANDB_MODE and the other WANDB_* variables apply
            tracker = WandBTracker("summ", name=run_dir.name, dir=str(run_dir))
        tracker.start()
        if name == "tensorboard":
            write_hparams(tracker.writer, _hparams(cfg))
        else:
            tracker.store_init_configuration(_hparams(cfg))
        trackers.append(tracker)
    return trackers


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
        return None


# The metrics the HParams tab shows beside each run's hyperparameters: scalars this run logs.
HPARAM_METRICS = ("val/loss", "val/perplexity", "train/loss")


def write_hparams(writer, values: dict) -> None:
    """The run's hyperparameters into its own event file, naming the metrics it logs.

    Accelerate's `init_trackers(config=...)` calls SummaryWriter.add_hparams, which writes them into a
    separate timestamped folder with no metrics: TensorBoard then lists two runs per training run and
    the HParams tab has no metric columns."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(values, {name: float("nan") for name in HPARAM_METRICS}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _hparams(cfg: RunConfig) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flat_config(cfg.to_dict()).items()}


def save_adapter(model, tokenizer, cfg: RunConfig, run_dir: Path) -> Path:
    """The trained adapter in PEFT format, with the tokenizer (its chat template the trained prompt),
    the prompt, the run's decoding, where the base comes from, and a model card."""
    with atomic_folder(Path(run_dir) / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded_from = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        set_base_model(tmp, base_model_record(cfg, loaded_from))
        write_portable_files(tmp, cfg, tokenizer, getattr(model, "generation_config", None))
        write_model_card(cfg, run_dir, tmp)
    return Path(run_dir) / "adapter"


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """metrics.json, and the adapter's model card again with its figures."""
    write_json(Path(run_dir) / "metrics.json", metrics)
    refresh_model_card(run_dir)
