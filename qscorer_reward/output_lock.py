"""One writer per output file: the lock a ``qscorer score --output FILE`` run holds for its whole run.

The lock is ``FILE.lock`` beside the output, held with `filelock` (``flock`` on POSIX, a locked
byte range on Windows), so the operating system releases it when the run ends, even when it is
killed. The file also says who holds it (process id, host, start time, command), for the message
that refuses a second run; it is removed when the run ends normally.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LOCK_SUFFIX = ".lock"


class OutputInUse(RuntimeError):
    """Another run holds the lock of this output."""


def lock_path(output: Path) -> Path:
    """The lock file of ``output``."""
    return output.with_name(output.name + LOCK_SUFFIX)


@contextmanager
def locked_output(output: Path) -> Iterator[None]:
    """Hold the lock of ``output`` for the ``with`` block (its folder is created if needed).

    Raises `OutputInUse` at once, naming the holder, when another run holds it, and `OSError`
    when the lock file cannot be written (a read-only or missing folder).
    """
    from filelock import FileLock, Timeout

    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = _read_holder(path)  # before trying: an older filelock empties the file when it opens it
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUse(
            f"{output} is being written by another qscorer run ({holder or f'it holds {path}'}); "
            "wait for it to end, or write to another --output"
        ) from None
    try:
        _write_holder(path)
        yield
    finally:
        with suppress(OSError):
            path.unlink()  # while still held, so that no run can take the old file after us
        lock.release()


def _describe_this_run() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    return f"process {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


def _write_holder(path: Path) -> None:
    with suppress(OSError):  # the description only helps the message; the lock is what matters
        handle = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(handle, 0)
            os.write(handle, (_describe_this_run() + "\n").encode("utf-8", "backslashreplace"))
        finally:
            os.close(handle)


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
