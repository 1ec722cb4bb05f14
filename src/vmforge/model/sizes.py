"""Human sizes, parsed and printed the way qemu-img does (binary units)."""

from __future__ import annotations

import math

from ..errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str | int) -> int:
    """``"10G"`` -> 10737418240. Accepts K/M/G/T/P/E with optional ``iB``/``B``; no suffix is bytes.

    Raises UsageError for anything else (negative, empty, fractional bytes).
    """
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"invalid size {text}: must not be negative")
        return text
    s = text.strip().lower()
    for tail in ("ib", "b"):
        if s.endswith(tail) and len(s) > len(tail) and s[-len(tail) - 1] in "kmgtpe":
            s = s[: -len(tail)]
            break
    unit = s[-1:] if s[-1:] in _UNITS and not s[-1:].isdigit() else ""
    number = s[: len(s) - len(unit)] if unit else s
    try:
        value = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise UsageError(
            f"invalid size '{text}'", hint="use a number with an optional suffix: 512M, 10G, 1.5T"
        ) from None
    result = int(value * _UNITS[unit])
    if result < 0 or (isinstance(value, float) and value * _UNITS[unit] != result):
        raise UsageError(f"invalid size '{text}': must be a whole, non-negative number of bytes")
    return result


def human_size(n: int) -> str:
    """qemu-img's style (util/cutils.c size_to_str): ``10 MiB``, ``3.32 MiB``, ``512 B``.

    The unit switches up once the integer part would reach 1000.
    """
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = max(0, min((exp - 1) // 10, 6))
    value = n / (1 << (i * 10))
    return f"{value:0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int) -> int:
    return n // a * a
