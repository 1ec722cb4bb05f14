"""Helpers shared by the command modules: errors, -o parsing, JSON and size output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from ..errors import OptionError, UsageError
from ..model import parse_size
from ..util.lazy import LazyModule

Sub = Any  # argparse's _SubParsersAction is private

#: a module imported on first use, so that commands needing heavy parts (the QEMU
#: runtime, OVA packages) do not slow down the start of every other command
Lazy = LazyModule


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with a hint, like every other error.

    ``late_epilog`` adds text to the help that is made only when the help is shown,
    for lists whose source is costly to import (export targets).
    """

    late_epilog: Callable[[], str] | None = None

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see '{self.prog} --help'")

    def format_help(self) -> str:
        if self.late_epilog is not None:
            self.epilog = (self.epilog or "") + self.late_epilog()
            self.late_epilog = None
        return super().format_help()


class LazyChoices:
    """``choices`` for argparse read from a costly module only when a command that has
    them is parsed (give the argument a ``metavar``: argparse lists choices otherwise)."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self._values: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._load())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())


class OnlyCommand:
    """A stand-in for the subcommands action that keeps one command: ``register()``
    builds that command's parser as usual, and the others' parsers are :class:`Unused`
    (so a command line pays for its own options only)."""

    def __init__(self, sub: Sub, name: str) -> None:
        self._sub = sub
        self._name = name

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name == self._name:
            return self._sub.add_parser(name, **kwargs)
        return Unused()


class Unused:
    """The parser of a command not being run: takes every call and attribute that
    ``register()`` gives a parser (arguments, groups, nested subcommands) and keeps
    nothing."""

    def __getattr__(self, name: str) -> Any:
        return self._take

    def __setattr__(self, name: str, value: object) -> None:
        pass

    def _take(self, *args: object, **kwargs: object) -> Unused:
        return self


def command(sub: Sub, name: str, help_text: str, examples: str,
            late_epilog: Callable[[], str] | None = None) -> argparse.ArgumentParser:
    """A subcommand whose help ends with its examples, laid out as written (then with
    ``late_epilog()``, made only when the help is shown)."""
    parser = sub.add_parser(
        name, help=help_text, description=help_text, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if late_epilog is not None and not isinstance(parser, Unused):
        assert isinstance(parser, Parser), "subcommands are made by cli.common.Parser"
        parser.late_epilog = late_epilog
    return parser  # type: ignore[no-any-return]


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
    import json  # ~3 ms, for the few commands that print JSON

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
