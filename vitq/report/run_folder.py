"""The run folder: config.yaml, plan, metrics.json, report.md and log.txt, written so that a
failed run never poses as a complete one.

Files are written into ``<out>.partial/``; only :meth:`RunFolder.finish` renames it to ``<out>``.
A run that fails leaves ``<out>.partial/`` with its ``log.txt`` and ``error.txt``. One run at a
time owns ``<out>``: a second run into the same folder is refused while the first holds
``<out>.lock`` (released by the kernel when a run dies, so a crash never leaves it stuck). A
resumed run must have the settings of the run it resumes (:meth:`RunFolder.start`). Every file is
written atomically.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from ..errors import VitqError
from ..files import FolderLock, atomic_write_text


def _flat(data: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(data, dict):
        out: Dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(saved: Dict[str, Any], given: Dict[str, Any]) -> list:
    """``"key: given (saved: value)"`` for each setting that differs between two run configs."""
    a, b = _flat(json.loads(json.dumps(saved, default=str))), _flat(json.loads(json.dumps(given, default=str)))
    return [f"{k}: {b.get(k, '(absent)')} (the run being resumed: {a.get(k, '(absent)')})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class RunFolder:
    """Writes one run's files; use as a context manager."""

    def __init__(self, out: str | Path, overwrite: bool = False, echo: bool = True, resume: bool = False) -> None:
        self.final = Path(out).expanduser()
        if self.final.exists() and not self.final.is_dir():
            raise VitqError(f"--out {self.final} is an existing file, not a run folder: choose another --out")
        self._lock = FolderLock(self.final)
        try:
            self._lock.acquire()
            self._open(overwrite, resume)
        except BaseException:
            self._lock.release()
            raise
        self.log = logging.getLogger(f"vitq.run.{id(self)}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        handler = logging.FileHandler(self.path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        self.log.addHandler(handler)
        if echo:
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(console)
        self.finished = False

    def _open(self, overwrite: bool, resume: bool) -> None:
        if self.final.exists() and not overwrite:
            if any(self.final.iterdir()):
                raise VitqError(f"run folder {self.final} already exists: choose another --out or pass --overwrite")
        self.path = self.final.with_name(self.final.name + ".partial")
        self.resumed = resume
        if resume:
            if not self.path.is_dir():
                raise VitqError(f"nothing to resume: {self.path} does not exist (it is left by an unfinished run "
                                "with the same --out); drop --resume to start afresh")
            (self.path / "error.txt").unlink(missing_ok=True)
        else:
            if self.path.exists():
                shutil.rmtree(self.path)
            try:
                self.path.mkdir(parents=True)
            except OSError as err:
                raise VitqError(f"cannot create the run folder {self.path}: {err.strerror}; choose an --out "
                                "you can write to") from None

    def start(self, config: Dict[str, Any], name: str = "config.yaml") -> Path:
        """Write the run's settings; a resumed run must have the same ones as the run it resumes.

        Raises:
            VitqError: on ``--resume`` with settings that differ from the saved ones (each named).
        """
        saved_path = self.path / name
        if self.resumed and saved_path.is_file():
            try:
                saved = yaml.safe_load(saved_path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                saved = None
            if saved is not None:
                diff = config_differences(saved, config)
                if diff:
                    raise VitqError("--resume: this command's settings differ from those of the run being resumed "
                                    f"({'; '.join(diff)}); rerun with the saved settings (in {saved_path}), or drop "
                                    "--resume to start afresh")
        return self.write_yaml(name, config)

    def write_json(self, name: str, data: Dict[str, Any]) -> Path:
        return atomic_write_text(self.path / name, json.dumps(data, indent=1, default=str) + "\n")

    def write_yaml(self, name: str, data: Dict[str, Any]) -> Path:
        plain = json.loads(json.dumps(data, default=str))  # tuples → lists, odd types → str
        return atomic_write_text(self.path / name, yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def finish(self) -> Path:
        """Rename the finished run into place and return its folder."""
        self._close()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.path.rename(self.final)
        self.finished = True
        self._lock.release()
        return self.final

    def _close(self) -> None:
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc: Optional[BaseException], tb) -> None:
        if exc is not None and not self.finished:
            self.log.error("run failed: %s: %s", type(exc).__name__, exc)
            self.write_text("error.txt", f"{type(exc).__name__}: {exc}\n")
            self._close()
        self._lock.release()
