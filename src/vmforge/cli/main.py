"""The ``vmforge`` command: argument parsing, the error handler, and exit codes.

This package is the only place that prints or exits. Each command group lives in its
own module and registers its subcommands on the parser built here. A command line
loads only the module of the command it runs and builds only that command's parser
(``COMMANDS``); the help and any line without a known command build them all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UsageError, VmforgeError
from .common import CommandFailed, OnlyCommand, Parser, die

#: every command, in the order of 'vmforge --help', with the module of this package
#: whose ``register`` defines it (tests/cli/test_startup.py holds this to the parsers)
COMMANDS = {
    "info": "images", "create": "images", "convert": "images", "compare": "images",
    "map": "images", "check": "images", "measure": "images", "formats": "images",
    "resize": "lifecycle", "commit": "lifecycle", "rebase": "lifecycle", "dd": "lifecycle",
    "clone": "lifecycle", "overlay": "lifecycle",
    "snapshot": "snapshots", "amend": "snapshots",
    "inspect": "safety", "partitions": "safety",
    "run": "vm", "host": "vm", "vm": "vm",
    "import": "packages",
    "export": "export", "validate": "export",
}

EPILOG = """\
examples:
  vmforge create -f qcow2 base.qcow2 10G        a new empty 10 GiB qcow2
  vmforge info disk.vmdk                        what a file is (format probed)
  vmforge convert -p -O qcow2 disk.raw disk.qcow2
  vmforge convert -c -O qcow2 -o compression_type=zstd disk.raw small.qcow2
  vmforge create -f qcow2 -b base.qcow2 -F qcow2 vm1.qcow2   an overlay on a base
  vmforge compare a.qcow2 b.raw                 exit 0 identical, 1 different, 2 error
  vmforge check --output=json disk.qcow2        exit 0 clean, 2 corrupt, 3 leaks

'vmforge COMMAND --help' shows each command's options and examples.
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` (a key of ``COMMANDS``) of that
    one only: the same options, help and errors for it, at a fraction of the cost."""
    parser = Parser(
        prog="vmforge",
        description="Create, inspect and convert virtual machine disk images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmforge {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and internal detail on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    if command is not None:
        module = importlib.import_module(f".{COMMANDS[command]}", __package__)
        module.register(OnlyCommand(sub, command))
        return parser
    for name in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f".{name}", __package__).register(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list runs, when only its parser is needed: the first
    argument after the global ``--debug`` (None for help, --version, an unknown or no
    command, which need every command's parser)."""
    for arg in argv:
        if arg != "--debug":
            return arg if arg in COMMANDS else None
    return None


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so half-written outputs are removed on the way out
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _terminate)
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    if debug:  # shows each command vmforge runs (util.run logs them)
        import logging

        logging.basicConfig(level=logging.DEBUG, format="vmforge: debug: %(message)s")
    parser = build_parser(command_of(args_list))
    try:
        args = parser.parse_args(args_list)
        result: int = args.func(args)
        return result
    except CommandFailed as failed:
        return failed.code
    except VmforgeError as err:
        if debug:
            raise
        code = 2 if isinstance(err, UsageError) and "args" not in locals() else 1
        return die(str(err), err.hint, code=code)
    except KeyboardInterrupt:
        if debug:
            raise
        return die("interrupted", "nothing was left under the destination name", code=130)
    except BrokenPipeError:
        return 1
    except MemoryError:
        if debug:
            raise
        return die("out of memory", "this should not happen: please report it with --debug")
    except OSError as err:
        if debug:
            raise
        name = f"{err.filename}: " if err.filename else ""
        return die(f"{name}{err.strerror or err}")
    except Exception as err:  # a bug: still one line, the traceback with --debug
        if debug:
            raise
        return die(f"internal error: {type(err).__name__}: {err}",
                   "this is a vmforge bug; rerun with --debug and report the traceback")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
