"""The run folder: config.yaml, plan, metrics.json, report.md and log.txt, written so that a
failed run never poses as a complete one.

Files are written into ``<out>.partial/``; only :meth:`RunFolder.finish` renames it to ``<out>``.
A run that fails leaves ``<out>.partial/`` with its ``log.txt`` and ``error.txt``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from ..errors import VitqError


class RunFolder:
    """Writes one run's files; use as a context manager."""

    def __init__(self, out: str | Path, overwrite: bool = False, echo: bool = True, resume: bool = False) -> None:
        self.final = Path(out).expanduser()
        if self.final.exists() and not overwrite:
            if not self.final.is_dir() or any(self.final.iterdir()):
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
            self.path.mkdir(parents=True)
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

    def write_json(self, name: str, data: Dict[str, Any]) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        return path

    def write_yaml(self, name: str, data: Dict[str, Any]) -> Path:
        path = self.path / name
        plain = json.loads(json.dumps(data, default=str))  # tuples → lists, odd types → str
        path.write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def finish(self) -> Path:
        """Rename the finished run into place and return its folder."""
        self._close()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.path.rename(self.final)
        self.finished = True
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
