"""One writer per run folder.

Two commands writing into one `log.output_dir` interleave their logs, TensorBoard events and
checkpoints into a folder that belongs to neither. Whatever writes a run folder (training, a resume,
a search, a Ray trial) first takes an exclusive lock on `<folder>/.summ.lock`; a second command is
refused at once with the holder's pid and start time. An evaluation or a LEAD baseline only reads the
run and writes its own subfolder (eval/, zero_shot/, lead/, the name given): it shares the run
folder with other evaluations and takes its subfolder alone: several decodings of one run score
side by side, while training into it and a second evaluation into the same subfolder are refused. The
operating system releases a lock when its process ends, however it ends, so a crash never leaves a
stale lock. A process may take a folder it holds again (training's final evaluation, a resume in the
same process).
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
# Folders this process holds: path -> (the open lock file (closing it would release the lock), its mode).
_held: dict[str, tuple[object, int]] = {}


class RunFolderBusy(ConfigError):
    """Another process is writing the run folder."""


def hold_run_folder(folder: str | Path, what: str) -> None:
    """Take `folder` (made if missing) for this process alone, or raise RunFolderBusy naming the holder.
    `what` says what this process will write ("training", "search")."""
    _take(Path(folder).resolve(), what, fcntl.LOCK_EX)


def hold_run_output(run_dir: str | Path, output: str, what: str) -> None:
    """Share `run_dir` with other readers and take its subfolder `output` alone ("evaluation" into
    eval/, "LEAD baseline" into lead/), or raise RunFolderBusy naming the holder."""
    run_dir = Path(run_dir).resolve()
    _take(run_dir, what, fcntl.LOCK_SH)
    _take(run_dir / output, what, fcntl.LOCK_EX)


def _take(folder: Path, what: str, mode: int) -> None:
    held = _held.get(str(folder))
    if held is not None and (held[1] == fcntl.LOCK_EX or mode == fcntl.LOCK_SH):
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = held[0] if held is not None else open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = _holder(lock.read())
        if held is None:
            lock.close()
        else:  # flock converts shared to exclusive by release and retake: keep the shared lock if we can
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                _held.pop(str(folder))
                lock.close()
        raise RunFolderBusy(f"{folder}: in use by {holder}; wait for it to end or write elsewhere "
                            f"(--set log.output_dir=...); {what} refused") from None
    # A writer's record replaces the file; readers sharing the folder add theirs beside the live ones.
    lock.seek(0)
    kept = _live_records(lock.read()) if mode == fcntl.LOCK_SH else []
    lock.seek(0)
    lock.truncate()
    lock.write("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(
        {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "what": what,
         "command": " ".join(sys.argv)}) + "\n")
    lock.flush()
    _held[str(folder)] = (lock, mode)


def _live_records(text: str) -> list[dict]:
    """The records of processes other than this one that are still running."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            pid = int(record["pid"])
        except (ValueError, KeyError, TypeError):
            continue
        if pid != os.getpid() and _running(pid):
            records.append(record)
    return records


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _holder(text: str) -> str:
    records = _live_records(text)
    if not records:
        return "another process"
    record = records[-1]
    return f"{record['what']} pid {record['pid']} started {record['started']} (`{record['command']}`)"
