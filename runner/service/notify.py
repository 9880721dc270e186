"""The systemd notify protocol (``sd_notify``), without a library.

A notification is one datagram of ``KEY=VALUE`` lines sent to the unix socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
Under ``Type=notify`` systemd considers the unit started on ``READY=1``, shows
``STATUS=`` in ``systemctl status``, and with ``WatchdogSec=`` kills the
service when ``WATCHDOG=1`` pings stop for that long.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon
calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger("snapfleet.notify")

_ENV_SOCKET = "NOTIFY_SOCKET"
_ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
_ENV_WATCHDOG_PID = "WATCHDOG_PID"


class Notifier:
    """Sends state changes and watchdog pings to systemd.

    ``Notifier()`` reads ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and
    ``$WATCHDOG_PID`` from the environment and removes them from it, so that
    child processes (QEMU, nft, debootstrap) do not inherit them: a child
    writing to the socket would be refused under ``NotifyAccess=main`` at best
    and confuse systemd at worst. Tests pass ``environ`` (or use
    ``Notifier.for_socket``) instead.

    Sending never blocks: the socket is non-blocking, and a failed send is
    logged at debug level and otherwise ignored, because a lost status
    message must never take the daemon down.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop(_ENV_SOCKET, None) or None
        usec = env.pop(_ENV_WATCHDOG_USEC, None)
        pid = env.pop(_ENV_WATCHDOG_PID, None)
        self._address = _socket_address(address)
        self._watchdog_usec = _watchdog_usec(usec, pid)
        self._sock: socket.socket | None = None

    @classmethod
    def for_socket(cls, address: str | None, *, watchdog_usec: int | None = None) -> Notifier:
        """A notifier for an explicit socket (``/path`` or ``@abstract``) and watchdog."""
        env: dict[str, str] = {}
        if address is not None:
            env[_ENV_SOCKET] = address
        if watchdog_usec is not None:
            env[_ENV_WATCHDOG_USEC] = str(watchdog_usec)
        return cls(env)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a usable ``$NOTIFY_SOCKET``."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec=``); None when off."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``READY=1``), optionally with a status line."""
        return self.send(READY="1", STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form status ``systemctl status`` shows."""
        return self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (``STOPPING=1``)."""
        return self.send(STOPPING="1", STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires.

        Useful while draining jobs on stop when the grace is longer than
        ``TimeoutStopSec=``; systemd ignores it outside a start or stop.
        """
        return self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1_000_000)))

    def watchdog(self) -> bool:
        """One watchdog keep-alive ping (``WATCHDOG=1``)."""
        return self.send(WATCHDOG="1")

    def send(self, **fields: str | None) -> bool:
        """Send one notification of the given fields (None values are left out).

        Returns True if the datagram was handed to the kernel.
        """
        if self._address is None:
            return False
        message = "\n".join(
            f"{key}={_one_line(value)}" for key, value in fields.items() if value is not None
        )
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # EAGAIN when systemd's queue is full, ENOENT/ECONNREFUSED when it
            # went away: nothing useful to do but try again next time.
            log.debug("sd_notify failed", error=str(exc), message=message)
            return False
        return True

    def close(self) -> None:
        """Close the socket (later sends reopen it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping the systemd watchdog every half ``WatchdogSec=`` while ``healthy()``.

    A blocked event loop stops the pings by itself (this coroutine does not
    get to run); ``healthy()`` covers the rest, e.g. a scheduler loop that no
    longer makes progress. While unhealthy no pings are sent, so systemd
    restarts the service once ``WatchdogSec=`` passes; if health comes back
    first, pinging resumes. Returns at once when there is no watchdog; runs
    until cancelled otherwise.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    was_healthy = True
    while True:
        await asyncio.sleep(interval)
        ok = healthy()
        if ok:
            notifier.watchdog()
        if ok != was_healthy:
            if ok:
                log.info("healthy again; resuming watchdog pings")
            else:
                log.warning("unhealthy; withholding watchdog pings", interval_s=interval)
            was_healthy = ok


def _socket_address(value: str | None) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd 253+ may also hand out vsock:CID:PORT (for VMs); we never run there.
    log.debug("ignoring unsupported NOTIFY_SOCKET", address=value)
    return None


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    if not usec:
        return None
    # WATCHDOG_PID names the process the watchdog is meant for; if it is set
    # and is not us, we inherited it by mistake and must not ping.
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.debug("ignoring malformed WATCHDOG_USEC", value=usec)
        return None
    return value if value > 0 else None


def _one_line(value: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return value.replace("\n", " ")
