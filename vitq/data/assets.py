"""Where the real reference models and images are: ``$VITQ_ASSETS``, else ``../shared/assets``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_REPO = Path(__file__).resolve().parents[2]


def assets_dir(override: Optional[str | Path] = None) -> Path:
    """The assets folder: ``override``, ``$VITQ_ASSETS``, or ``shared/assets`` beside the repository."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("VITQ_ASSETS")
    if env:
        return Path(env).expanduser()
    return _REPO.parent / "shared" / "assets"
