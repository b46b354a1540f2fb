"""Name → class registries filled by decorators (observers, recipes, adapters, ...)."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Tuple, TypeVar

from .errors import VitqError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of implementations.

    Example:
        >>> observers = Registry("observer")
        >>> @observers.register("minmax")
        ... class MinMax: ...
        >>> observers.get("minmax").__name__
        'MinMax'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise VitqError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> Tuple[str, ...]:
        return tuple(sorted(self._items))

    def items(self) -> Iterator[Tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items
