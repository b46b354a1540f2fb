"""The one exception type vitq raises for bad input, and helpers that raise it."""
import re
from dataclasses import fields
from typing import Any, Dict, Mapping


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


def check_by_bits(value: Any, where: str, example: str) -> Dict[str, Dict[str, Any]]:
    """A ``by_bits`` mapping (``wXaY`` to the settings that replace others at that bit-width) as a
    plain dict, or an error naming ``where`` and showing ``example`` (``w4a4: {min_a_bits: 4}``).

    Each entry's keys and values are the caller's to check: only it knows what it configures.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(value, Mapping):
        raise VitqError(f"{prefix}'by_bits' maps wXaY to settings, e.g. {{{example}}}; got {value!r}")
    by_bits = {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
    for key, changes in by_bits.items():
        if not re.fullmatch(r"w[2-8]a[2-8]", key) or not isinstance(changes, dict):
            raise VitqError(f"{prefix}by_bits: {key!r} must be wXaY (bits 2-8) with a mapping of settings, "
                            f"e.g. {example}")
        if "by_bits" in changes:
            raise VitqError(f"{prefix}by_bits.{key} cannot nest by_bits")
    return by_bits
