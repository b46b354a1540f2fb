"""Files that are either whole or absent: atomic writes, and a lock that a crashed process releases.

Every state file a run writes (checkpoints, plans, metrics) goes through :func:`atomic_write`:
the bytes go to a temporary file in the same folder, which then replaces the target in one
``os.replace``, so a kill during the save leaves the previous file (or none), never half of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import VitqError

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then move it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_state(path: str | Path) -> Any:
    """``torch.load`` of a checkpoint a run wrote, or a :class:`VitqError` that says how to go on."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # truncated, overwritten, not a torch file
        raise VitqError(f"cannot read the checkpoint {path} ({type(err).__name__}); it is damaged: delete it to "
                        "redo that step, or drop --resume to start the run afresh") from None


class FolderLock:
    """An exclusive lock on ``<folder>.lock`` held while a run writes ``folder``.

    The lock is an ``flock`` on an open file: the kernel releases it when the process ends, however
    it ends, so a crashed run never leaves it stuck (the stale file is simply locked again).
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.path = folder.with_name(folder.name + ".lock")
        self._file: Optional[Any] = None

    def acquire(self) -> "FolderLock":
        if fcntl is None:  # pragma: no cover
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "a+").close()
        except OSError as err:
            raise VitqError(f"cannot write to {self.path.parent}: {err.strerror}; choose an --out you can "
                            "write to") from None
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                f.close()
                raise VitqError(f"another vitq run ({owner}) is writing to {self.path.with_suffix('')}: wait for it "
                                "to end or choose another --out") from None
            # the holder before us may have removed the file after we opened it: lock the current one
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
