"""Optional dependencies of the deploy path (``pip install 'vitq[deploy]'``), imported on first use."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import VitqError

INSTALL_HINT = "pip install 'vitq[deploy]'"


def require(module: str) -> ModuleType:
    """Import ``onnx`` or ``onnxruntime``; a :class:`VitqError` naming the extra if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise VitqError(
            f"the deploy path needs the {module.split('.')[0]!r} package, which is not installed "
            f"({err}); install it with: {INSTALL_HINT}"
        ) from None
