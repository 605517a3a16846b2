"""Atomic training checkpoints: adapter, optimizer, scheduler, loss scaler, RNG and data position,
plus what a resume must match (the resolved config, the number of processes, the training data).

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed
or out of disk mid-save leaves the previous checkpoint as the latest complete one. State is read
back with `torch.load(weights_only=True)`: no pickled code runs on resume.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import torch

from summ.files import WriteError, atomic_folder

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE, RESUME_RECORD = "train_state.json", "resume_record.json"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or cannot be loaded safely."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, train_state: dict,
                    resume_record: dict, keep_last: int) -> Path:
    """Write checkpoint `step-<step>` atomically on the main process; every rank stores its RNG.

    A failed write (a full disk) removes its temporary folder and raises a `CheckpointError` that
    names the last complete checkpoint, which is untouched.
    """
    final = checkpoint_dir(run_dir) / f"step-{step:07d}"
    previous = latest_checkpoint(run_dir)
    try:
        if accelerator.is_main_process:
            with atomic_folder(final) as tmp:
                _write_state(accelerator, tmp, model, optimizer, scheduler, train_state, resume_record)
            prune_checkpoints(run_dir, keep_last)
        else:
            _write_state(accelerator, final.with_name(f".tmp-{final.name}"), model, optimizer, scheduler,
                         train_state, resume_record)
    except WriteError as e:
        raise CheckpointError(f"checkpoint at step {step} not written: {e}. The last complete checkpoint, "
                              f"{previous or 'none yet'}, is intact; {_what_to_fix(e)} and continue with "
                              f"--resume") from e
    accelerator.wait_for_everyone()
    return final


def _what_to_fix(e: WriteError) -> str:
    """Advice that fits the failure: free space only for a full disk."""
    code = getattr(e.__cause__, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the run folder writable"
    if code is None:  # torch's zip writer reports a disk filling under it without an errno
        return "check the free space and that the run folder is writable"
    return "fix the cause above"


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints. One that cannot be removed (permissions, a
    file held open on a network file system) costs disk space, not the run: it is named and left."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        try:
            shutil.rmtree(old)
        except OSError as e:
            log.warning("could not remove the old checkpoint %s (%s); training goes on, remove it by hand", old, e)


def _write_state(accelerator, folder: Path, model, optimizer, scheduler, train_state: dict,
                 resume_record: dict) -> None:
    accelerator.wait_for_everyone()  # the main process has made the folder
    torch.save(rng_state(), folder / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder / "adapter", safe_serialization=True)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), folder / "scaler.pt")
        (folder / RESUME_RECORD).write_text(json.dumps(resume_record, indent=1))
        (folder / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
    accelerator.wait_for_everyone()  # every rank's RNG is in before the rename


def read_resume_record(path: Path) -> dict | None:
    """What the checkpoint's run was: its resolved config, world size and data fingerprint."""
    file = Path(path) / RESUME_RECORD
    return json.loads(file.read_text()) if file.is_file() else None


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved train state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {TRAIN_STATE})")
    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{path}: adapter does not match the model (unexpected keys "
                              f"{result.unexpected_keys[:3]})")
    optimizer.load_state_dict(load_state(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(load_state(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load_state(path / "scaler.pt"))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(load_state(rng_file))
    return json.loads(state_file.read_text())


def load_state(file: Path, **kwargs):
    """torch.load restricted to tensors and plain containers; anything else is refused, never run."""
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # torch's own text goes on to suggest weights_only=False, the unsafe way out; only its
        # finding is kept.
        found = re.search(r"(?i)unsupported (?:global: )?(GLOBAL \S+|operand \S+)", str(e))
        what = f"unsupported {found.group(1)}" if found else "unsupported pickle content"
        raise CheckpointError(
            f"{file}: refused to load: it holds Python objects other than tensors and plain containers "
            f"({what}). Checkpoints written by summ never do, and unpickling such a file can run "
            f"arbitrary code; resume from another checkpoint or start a new run") from None
