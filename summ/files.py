"""Files that are written whole or not at all, and text files read line by line.

Everything a run leaves behind (checkpoints, the adapter, merged weights, metrics) goes through
`atomic_folder` or `write_atomic`: it is written beside its final name and renamed into place, so
a run killed or out of disk mid-write leaves the previous version, never half of a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A file with a NUL byte in its first block is binary (a parquet or zip file renamed .jsonl, say).
_SNIFF_BYTES = 8192


class WriteError(OSError):
    """A file or folder could not be written (disk full, permissions); nothing partial is left."""


@contextmanager
def atomic_folder(final: str | Path, *, shared_cache: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    On any error the temporary folder is removed and `final` is left as it was. An `OSError`
    (disk full, permissions) comes back as a `WriteError` that names the folder.
    `shared_cache`: several processes may build the same `final` at once (cached weights); each
    builds in its own temporary folder and the first rename wins.
    """
    final = Path(final)
    if shared_cache:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        tmp.chmod(0o755)
    else:
        tmp = final.with_name(f".tmp-{final.name}")
    try:
        if not shared_cache:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)
        if shared_cache and final.exists():
            shutil.rmtree(tmp)  # another process finished the same build first
            return
        if final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (shared_cache and final.exists()):  # another process renamed the same build first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError) or not is_write_failure(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise WriteError(f"could not write {final}: {reason}; nothing was written there") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_write_failure(e: Exception) -> bool:
    """An OSError, or what torch.save and safetensors raise when the disk fills under them."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return type(e).__name__ == "SafetensorError" or (
        isinstance(e, RuntimeError) and any(k in text for k in ("inline_container", "file write failed",
                                                                 "unexpected pos", "PytorchStreamWriter")))


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {e.strerror or e}") from e


def write_json(path: str | Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def json_records(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file the project wrote (log.jsonl, predictions.jsonl). A line
    that does not parse, such as the last line of a run killed mid-write, is left out; data files go
    through `summ.data`, which counts and reports such lines instead."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def text_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text) for each line of a UTF-8 file; text is None for a line that is
    not valid UTF-8, so one bad byte costs one line, not the file. A byte-order mark is dropped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None


def not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
