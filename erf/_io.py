"""Atomic file writes: a temporary file in the same folder, fsync, rename.

A reader (or a resumed run) sees either the old file or the new one, never a half-written
file, even when the writer is killed with SIGKILL mid-write. Temporaries that a killed writer
left behind (``PATH.<pid>.tmp`` of a process that no longer exists) are removed on the next write.
"""
from __future__ import annotations

import glob
import os
from typing import IO, Callable


def _remove_stale_temporaries(path: str) -> None:
    """Delete ``PATH.<pid>.tmp`` files left by writers that were killed (their process is gone)."""
    for tmp in glob.glob(glob.escape(path) + ".*.tmp"):
        pid = tmp[len(path) + 1:-len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except (PermissionError, OverflowError):
            pass  # another user's live process, or not a pid: leave it


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(fh)`` on a temporary binary file, fsync it and rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_savez(path: str, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` to ``path`` atomically (:func:`atomic_write`)."""
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays))
