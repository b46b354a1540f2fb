"""Search fitness functions: losses between a quantized output and the float one, lowest best.

Each fitness is one file of this package that registers a :class:`Fitness` in :data:`FITNESS`;
the search reads what it compares from the entry (``scope``), never from its name:

- ``scope="model"``: the model's outputs (logits, or a dense model's score maps).
- ``scope="unit"``: the searched unit's own output (a layer), with the quantized and float
  models' outputs at that layer; ``judge`` names the model-scope fitness (and its temperature)
  that selects among the search's states on held-out images, where one layer's loss cannot.

Adding a fitness: a new module here with ``@register_fitness("name", ...)`` on its loss
function (and a test of its values).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ...registry import Registry

Tensor = torch.Tensor
SCOPES = ("model", "unit")


@dataclass(frozen=True)
class Fitness:
    """A registered loss ``fn(quant, float_out, temperature) -> scalar`` and what it compares."""

    name: str
    fn: Callable[[Tensor, Tensor, float], Tensor]
    scope: str = "model"
    judge: Optional[Tuple[str, float]] = None

    def __call__(self, quant: Tensor, float_out: Tensor, temperature: float = 1.0) -> Tensor:
        return self.fn(quant, float_out, temperature)


FITNESS: Registry[Fitness] = Registry("fitness")


def register_fitness(name: str, scope: str = "model", judge: Optional[Tuple[str, float]] = None):
    """Register the decorated loss function under ``name`` (the function itself is returned)."""
    if scope not in SCOPES:
        raise ValueError(f"fitness scope must be one of {SCOPES}, got {scope!r}")
    if scope == "unit" and judge is None:
        raise ValueError("a unit-scope fitness names the model-scope fitness that judges held-out images")

    def decorator(fn: Callable[[Tensor, Tensor, float], Tensor]) -> Callable[[Tensor, Tensor, float], Tensor]:
        FITNESS.register(name)(Fitness(name, fn, scope, judge))
        return fn

    return decorator


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .infonce import infonce_loss  # noqa: E402
from .kl import kl_loss  # noqa: E402
from .local_contrastive import local_contrastive_loss  # noqa: E402
from .mse import mse_loss  # noqa: E402

__all__ = ["FITNESS", "Fitness", "SCOPES", "infonce_loss", "kl_loss", "local_contrastive_loss", "mse_loss",
           "register_fitness"]
