"""The ``vmforge`` command: argument parsing, the error handler, and exit codes.

This package is the only place that prints or exits. Each command group lives in its
own module and registers its subcommands on the parser built here.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UsageError, VmforgeError
from . import export, images, lifecycle, packages, safety, snapshots, vm
from .common import CommandFailed, Parser, die

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


def build_parser() -> argparse.ArgumentParser:
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
    images.register(sub)
    lifecycle.register(sub)
    snapshots.register(sub)
    safety.register(sub)
    vm.register(sub)
    packages.register(sub)
    export.register(sub)
    return parser


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
    parser = build_parser()
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
