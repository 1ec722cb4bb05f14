"""Short synchronous QMP sessions over a VM's private UNIX socket (``qemu.qmp`` package).

Each call opens a connection, negotiates capabilities, runs its commands and closes,
so any vmforge process (not only the one that started the VM) can drive a running VM.
QEMU's QMP socket serves one client at a time; sessions are kept short for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .errors import MachineError

Command = tuple[str, dict[str, Any] | None]
#: how long a failed QMP negotiation is retried (the previous client still closing)
NEGOTIATION_RETRY_SECONDS = 5.0


async def _connect(path: str, timeout: float) -> QMPClient:
    """A negotiated client. QEMU serves one QMP client at a time: while the previous
    session is still being torn down (a busy host), negotiation can fail; retry briefly."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(timeout, NEGOTIATION_RETRY_SECONDS)
    while True:
        client = QMPClient("vmforge")
        try:
            await asyncio.wait_for(client.connect(path), timeout)
            return client
        except QMPError as err:
            with contextlib.suppress(Exception):
                await client.disconnect()
            if loop.time() >= deadline:
                raise MachineError(f"cannot reach the VM's QMP socket {path}: {err}",
                                   hint="is the VM running? see 'vmforge vm list'") from None
            await asyncio.sleep(0.2)
        except (TimeoutError, OSError) as err:
            raise MachineError(f"cannot reach the VM's QMP socket {path}: {err or 'timed out'}",
                               hint="is the VM running? see 'vmforge vm list'") from None


async def _session(path: str, commands: Sequence[Command], timeout: float) -> list[Any]:
    client = await _connect(path, timeout)
    results: list[Any] = []
    try:
        for name, args in commands:
            try:
                results.append(await asyncio.wait_for(client.execute(name, args), timeout))
            except ExecuteError as err:
                raise MachineError(f"QMP {name} failed: {err.error.error.desc}") from None
            except TimeoutError:
                raise MachineError(f"QMP {name} got no answer within {timeout:g} s") from None
            except QMPError as err:
                # 'quit' may close the connection before its answer arrives
                if name == "quit":
                    results.append(None)
                    break
                raise MachineError(f"QMP {name}: connection lost ({err})") from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)
    return results


def qmp_session(path: str, commands: Sequence[Command], timeout: float = 10.0) -> list[Any]:
    """Run ``commands`` in one QMP session; returns each command's return value.

    Raises MachineError if the socket cannot be reached or a command fails.
    """
    return asyncio.run(_session(path, commands, timeout))


def qmp(path: str, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """One QMP command; its return value."""
    return qmp_session(path, [(command, args)], timeout)[0]
