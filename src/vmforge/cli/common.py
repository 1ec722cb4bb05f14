"""Helpers shared by the command modules: errors, -o parsing, JSON and size output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import OptionError, UsageError
from ..model import parse_size

Sub = Any  # argparse's _SubParsersAction is private


class Lazy:
    """A module imported on first use, so that commands needing heavy parts (the QEMU
    runtime, OVA packages) do not slow down the start of every other command."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


def command(sub: Sub, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose help ends with its examples, laid out as written."""
    return sub.add_parser(  # type: ignore[no-any-return]
        name, help=help_text, description=help_text, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter)


class CommandFailed(Exception):
    """Raised after a command has printed its own error; carries the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def die(message: str, hint: str | None = None, *, code: int = 1) -> int:
    """Print one error line (and a hint line) to stderr; return the exit code."""
    text = f"vmforge: {message}"
    if hint:
        text += f" (hint: {hint})"
    print(text, file=sys.stderr)
    return code


def parse_o(values: list[str] | None) -> dict[str, str]:
    """-o key=value[,key=value...], repeatable; later values win, like qemu-img."""
    out: dict[str, str] = {}
    for chunk in values or []:
        # qemu-img escapes commas inside values as ',,'
        parts = chunk.replace(",,", "\0").split(",")
        for part in parts:
            part = part.replace("\0", ",").strip()
            if not part:
                continue
            if "=" not in part:
                if part == "help":
                    raise UsageError("use 'vmforge formats' to list the options of each format")
                raise OptionError(f"option '{part}' needs a value (key=value)", option=part)
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=4))


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("human", "json"), default="human",
                        help="output format (default human)")


def add_safety(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--untrusted", action="store_true",
                        help="refuse any reference to another file (backing, data file)")
    parser.add_argument("--allow-data-file", action="store_true",
                        help="read a qcow2 external data file named inside the image")
    parser.add_argument("--parent", action="append", default=[], metavar="FILE",
                        help="a parent of a differencing VDI (matched by UUID; repeatable)")
    parser.add_argument("--replay-log", action="store_true",
                        help="replay a dirty VHDX log in memory instead of refusing the image "
                             "(the file is never written)")
