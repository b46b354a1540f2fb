"""The one exception type vitq raises for bad input, and helpers that raise it."""
from dataclasses import fields
from typing import Any, Mapping


class VitqError(ValueError):
    """Bad input or misuse, with a message that names the problem and the fix.

    The CLI prints the message without a traceback and exits with status 2.
    """


def reject_unknown_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    """Raise if ``data`` is not a mapping or has keys that are not fields of dataclass ``cls``."""
    if not isinstance(data, Mapping):
        raise VitqError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitqError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}")
