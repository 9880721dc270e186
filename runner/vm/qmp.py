"""A thin adapter over QEMU's own async QMP client (``qemu.qmp``).

Its exceptions are translated here into ``VMError``; nothing above this module
sees a ``qemu.qmp`` type.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from runner.errors import VMError


class Qmp:
    """One QMP session over an already-connected socket."""

    def __init__(self, vm_id: str) -> None:
        self._vm_id = vm_id
        self._client = QMPClient(f"snapfleet-{vm_id}")
        self._shutdowns = EventListener(("SHUTDOWN",))
        self._client.register_listener(self._shutdowns)

    async def connect(self, sock: socket.socket, timeout: float) -> None:
        """Greet QEMU over ``sock`` (one end of a socketpair QEMU holds the other of)."""
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise VMError(f"QMP handshake failed: {exc}", vm_id=self._vm_id) from exc

    async def command(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run one QMP command; VMError on failure or timeout."""
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except ExecuteError as exc:
            raise VMError(f"QMP {cmd} failed: {exc}", vm_id=self._vm_id) from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise VMError(f"QMP {cmd} failed: {exc!r}", vm_id=self._vm_id) from exc

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a file descriptor it can use as ``fd:<name>``."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise VMError(f"passing fd to QEMU failed: {exc!r}", vm_id=self._vm_id) from exc
        await self.command("getfd", {"fdname": name})

    async def wait_migration(self, timeout: float, *, incoming: bool = False) -> dict[str, Any]:
        """Poll until the (incoming or outgoing) migration finishes; VMError if it fails."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            info: dict[str, Any] = await self.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                reason = info.get("error-desc", status)
                raise VMError(f"migration {status}: {reason}", vm_id=self._vm_id)
            if incoming and status is None:
                # An incoming migration that finished leaves the VM paused with no status.
                run = await self.command("query-status")
                if run.get("status") in ("paused", "running", "postmigrate"):
                    return info
            if time.monotonic() > deadline:
                raise VMError(f"migration still {status} after {timeout:.0f}s", vm_id=self._vm_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def shutdown_reason(self, timeout: float) -> str | None:
        """Why QEMU shut down ("guest-reset", "guest-shutdown", "host-signal", ...), from
        its SHUTDOWN event; None if none arrives within ``timeout``."""
        try:
            event = await asyncio.wait_for(self._shutdowns.get(), timeout)
        except TimeoutError:
            return None
        data = event.get("data")
        reason = data.get("reason") if isinstance(data, dict) else None
        return reason if isinstance(reason, str) else None

    async def close(self) -> None:
        """Disconnect; after `quit` QEMU closes first and the client reports EOF, which is fine."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
