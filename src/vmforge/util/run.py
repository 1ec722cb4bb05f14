"""The one place vmforge starts another program (ARCHITECTURE.md convention 8).

Every child gets: arguments passed through ``os.fspath`` (no shell, ever), a clean
environment (only what a program needs to find its files and print plain text, not the
caller's secrets or ``LD_PRELOAD``), standard input from ``/dev/null`` (a child never
steals the terminal), and its command logged at debug level so ``--debug`` shows it.
A failure is a ``CommandError`` carrying the exit code, the command line and the tail of
what the program printed, in one readable line.

Only ``runtime/`` starts QEMU system emulators; qemu-img and friends are the tests'
oracle and are never run from here.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from ..errors import VmforgeError

log = logging.getLogger("vmforge.run")

Arg = str | os.PathLike[str]

#: variables passed through from the caller's environment; everything else is dropped
_PASSED = ("PATH", "HOME", "TMPDIR", "TZ")
#: how much of a failed program's output goes into the error message
_TAIL = 600


class CommandError(VmforgeError):
    """A program could not be started, timed out or exited non-zero."""

    def __init__(self, message: str, *, argv: Sequence[str], returncode: int | None = None,
                 output: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True)
class Result:
    """What a finished program did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: PATH/HOME/TMPDIR/TZ from ours, the C locale, plus ``extra``."""
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


def command_line(argv: Sequence[Arg]) -> list[str]:
    """``argv`` as strings (``os.fspath`` on each); refuses an empty command."""
    out = [os.fspath(a) for a in argv]
    if not out or not out[0]:
        raise CommandError("empty command", argv=out)
    return out


def describe(argv: Sequence[str]) -> str:
    """A command as a copy-pasteable shell line (for messages and logs)."""
    return shlex.join(argv)


def _tail(text: str) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


def _missing(argv: list[str], err: OSError) -> CommandError:
    return CommandError(f"cannot run {argv[0]}: {err.strerror or err}", argv=argv,
                        hint=f"is {os.path.basename(argv[0])} installed and on PATH?")


def which(program: str) -> str | None:
    """The full path of ``program`` on the clean PATH, or None."""
    return shutil.which(program, path=clean_env()["PATH"])


def run(argv: Sequence[Arg], *, timeout: float | None = 60, check: bool = True,
        env: Mapping[str, str] | None = None, cwd: Arg | None = None) -> Result:
    """Run a program to completion and capture its output (text, undecodable bytes replaced).

    Raises CommandError when it cannot start, runs past ``timeout`` seconds (it is
    killed), or, with ``check``, exits non-zero.
    """
    args = command_line(argv)
    log.debug("run: %s", describe(args))
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                              env=clean_env(env), cwd=os.fspath(cwd) if cwd else None,
                              timeout=timeout, check=False, errors="replace")
    except FileNotFoundError as err:
        raise _missing(args, err) from None
    except PermissionError as err:
        raise _missing(args, err) from None
    except subprocess.TimeoutExpired as err:
        out = err.stderr or err.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise CommandError(f"{args[0]} did not finish within {timeout:g} s: {describe(args)}"
                           + (f": {_tail(text)}" if text.strip() else ""), argv=args,
                           output=text) from None
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        output = (proc.stderr or "") + (proc.stdout or "")
        raise CommandError(
            f"{os.path.basename(args[0])} exited with code {proc.returncode}: "
            f"{_tail(output) or '(no output)'} [command: {describe(args)}]",
            argv=args, returncode=proc.returncode, output=output)
    return result


def spawn(argv: Sequence[Arg], *, stdout: IO[bytes] | int | None = subprocess.DEVNULL,
          stderr: IO[bytes] | int | None = subprocess.DEVNULL,
          env: Mapping[str, str] | None = None, new_session: bool = False
          ) -> subprocess.Popen[bytes]:
    """Start a program in the background (stdin from /dev/null); the caller waits for it.

    ``new_session`` detaches it from our terminal and process group, so Ctrl-C in the
    shell that started vmforge does not reach it.
    """
    args = command_line(argv)
    log.debug("spawn: %s", describe(args))
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=clean_env(env), start_new_session=new_session)
    except (FileNotFoundError, PermissionError) as err:
        raise _missing(args, err) from None
