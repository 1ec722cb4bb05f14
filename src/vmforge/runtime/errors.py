"""Errors of the QEMU runtime (children of VmforgeError, printed in one line by the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import VmforgeError


class MachineError(VmforgeError):
    """A VM could not be started, reached or stopped."""

    hint = "see 'vmforge vm logs NAME' and 'vmforge vm show NAME'"


class LaunchError(MachineError):
    """QEMU refused to start: carries its exit code, command line and output."""

    def __init__(self, message: str, *, argv: Sequence[str], returncode: int | None,
                 output: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


class GuestTimeout(MachineError):
    """The guest did not print its ready marker in time."""


class VmNotFound(MachineError):
    hint = "'vmforge vm list' shows the VMs that exist"


class VmExists(MachineError):
    hint = "choose another --name, or remove it with 'vmforge vm rm NAME'"
