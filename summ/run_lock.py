"""One writer per run folder.

Two commands writing into one `log.output_dir` interleave their logs, TensorBoard events and
checkpoints into a folder that belongs to neither. Whatever writes a run folder (training, a resume,
an evaluation, a search, a Ray trial) first takes an exclusive lock on `<folder>/.summ.lock`; a second
command is refused at once with the holder's pid and start time. The operating system releases the
lock when its process ends, however it ends, so a crash never leaves a stale lock. A process may take
the same folder again (training's final evaluation, a resume in the same process).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from summ.config import ConfigError

LOCK_NAME = ".summ.lock"
# Folders this process holds: path -> the open lock file (closing it would release the lock).
_held: dict[str, object] = {}


class RunFolderBusy(ConfigError):
    """Another process is writing the run folder."""


def hold_run_folder(folder: str | Path, what: str) -> None:
    """Take `folder` (made if missing) for this process, or raise RunFolderBusy naming the holder.
    `what` says what this process will write ("training", "evaluation", "search")."""
    folder = Path(folder).resolve()
    if str(folder) in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = _holder(lock.read())
        lock.close()
        raise RunFolderBusy(f"{folder}: in use by {holder}; wait for it to end or write elsewhere "
                            f"(--set log.output_dir=...); {what} refused") from None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "what": what,
                           "command": " ".join(sys.argv)}) + "\n")
    lock.flush()
    _held[str(folder)] = lock


def _holder(text: str) -> str:
    try:
        record = json.loads(text)
        return f"{record['what']} pid {record['pid']} started {record['started']} (`{record['command']}`)"
    except (ValueError, KeyError, TypeError):
        return "another process"
