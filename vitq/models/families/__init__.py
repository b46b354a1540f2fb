"""Model families: one file each, registering a :class:`~vitq.models.adapters.ModelAdapter` subclass
in :data:`~vitq.models.adapters.ADAPTERS` (chosen by module type).

Adding a family: a new module here whose adapter maps the family's float modules to quantized ones
and names its blocks, token grids and LayerNorm → linear pairs (and a test on a tiny model).
"""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
