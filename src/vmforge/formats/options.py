"""Checks shared by every format's ``create``: known -o keys, on/off flags, no backing."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import OptionError
from ..model.info import BackingRef


def parse_flag(key: str, value: str) -> bool:
    """qemu-img's boolean spellings: on/off, true/false, yes/no, 1/0."""
    v = value.lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise OptionError(f"invalid value '{value}' for {key}", option=key, hint="use on or off")


def check_create_options(fmt: str, options: Mapping[str, str], known: Mapping[str, str],
                         backing: BackingRef | None = None, *, has_backing: bool = False) -> None:
    """Refuse -o keys the format does not know, and a backing file it cannot hold."""
    if backing is not None and not has_backing:
        raise OptionError(f"{fmt} images cannot have a backing file", option="backing_file",
                          hint="use -O qcow2 for an overlay")
    for key in options:
        if key not in known:
            raise OptionError(f"{fmt} does not support option '{key}'", option=key,
                              hint=f"{fmt} takes: " + ", ".join(known))
