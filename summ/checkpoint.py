"""Atomic training checkpoints: adapter, optimizer, scheduler, loss scaler, RNG and data position.

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed
mid-save leaves the previous checkpoint as the latest complete one. State is read back with
`torch.load(weights_only=True)`: no pickled code runs on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


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
                    keep_last: int) -> Path:
    """Write checkpoint `step-<step>` atomically on the main process; every rank stores its RNG."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved train state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / "train_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no train_state.json)")
    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: adapter does not match the model (unexpected keys {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads(state_file.read_text())


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
