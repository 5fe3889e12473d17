"""The run folder: one writer at a time, and the metrics log a resumed run continues.

    with RunLock(out):        # RunLockedError naming the holder's PID when another run has it
        ...                   # write config.json, metrics.jsonl, checkpoints, panels

The lock is ``OUT/.lock``, held with ``flock`` for as long as the run writes
and holding its PID. The kernel drops the lock when its process dies, so a
run that was killed leaves no lock behind, only its PID in the file: the next
run takes the folder over and warns which PID it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path

from .errors import DataError, TCAEError

LOCK_NAME = ".lock"


class RunLockedError(TCAEError, RuntimeError):
    """Another process is writing to the run folder."""


class RunLock:
    """An exclusive lock on a run folder (created if missing), for the main process of a run."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another run (PID {holder}): one run writes to "
                                 "a folder at a time; use another --out, or wait for that run to end") from None
        previous = os.read(fd, 64).decode("ascii", "replace").strip()
        if previous:
            warnings.warn(f"{self.path.parent}: taking over the lock of PID {previous}, which ended without "
                          "releasing it", RuntimeWarning, stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        # The file stays: removing it would let a process that opened it meanwhile lock a deleted file.
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``path`` (metrics.jsonl) up to ``step``, for a run resumed from that step.

    Lines logged after ``step`` by a run that died after its last checkpoint
    are dropped. So is a last line cut short by that death, with a warning
    naming the file; an unreadable line before the last raises
    :class:`~tcae.errors.DataError` naming the file and line.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (ValueError, TypeError, KeyError):
            if number == len(lines):
                warnings.warn(f"{path}: dropping its last line, cut short ({line[:60]!r})", RuntimeWarning,
                              stacklevel=2)
                break
            raise DataError(f"{path} line {number} is not a metrics record ({line[:60]!r}); move the file "
                            "aside to resume") from None
        if record_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
