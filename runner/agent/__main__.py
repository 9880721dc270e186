"""Entry point: ``PYTHONPATH=/opt/snapfleet python3 -m runner.agent [options]``.

By default the agent finds the virtio-serial port named ``org.snapfleet.agent``
and serves the host on it. ``--socket`` serves over a unix socket instead and
``--no-system`` leaves the clock, RNG and hostname alone: together they run
the agent on a developer's host for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from collections.abc import Sequence

from runner.agent.channel import PORT_NAME, Channel, PortChannel, SocketChannel, find_port
from runner.agent.guest import Agent
from runner.agent.log import log
from runner.agent.processes import become_subreaper


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the agent's command line."""
    parser = argparse.ArgumentParser(prog="python3 -m runner.agent", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", help=f"virtio-serial device (default: the port named {PORT_NAME})")
    where.add_argument("--socket", help="serve over this unix socket instead (tests)")
    where.add_argument("--vsock", type=int, metavar="PORT", help="listen on this AF_VSOCK port")
    parser.add_argument(
        "--socket-mode",
        choices=("listen", "connect"),
        default="listen",
        help="listen on --socket (default) or connect to a host listening there",
    )
    parser.add_argument(
        "--no-system",
        action="store_true",
        help="never touch the clock, RNG or hostname (running on a host)",
    )
    parser.add_argument(
        "--kill-grace",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="SIGTERM to SIGKILL delay for timed-out and cancelled execs (default 2)",
    )
    return parser.parse_args(argv)


def open_channel(args: argparse.Namespace) -> Channel:
    """Open the channel the options name, waiting for the port to appear."""
    if args.socket is not None:
        path = args.socket
        if args.socket_mode == "connect":

            def connect() -> socket.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                except OSError:
                    sock.close()
                    raise
                return sock

            return SocketChannel(connect=connect)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        return SocketChannel(listener=listener)
    if args.vsock is not None:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, args.vsock))
        listener.listen(1)
        return SocketChannel(listener=listener)
    path = args.port
    waited = False
    while path is None:  # virtio_console may still be probing
        path = find_port()
        if path is None:
            if not waited:
                log(f"waiting for virtio-serial port {PORT_NAME}")
                waited = True
            time.sleep(0.05)
    return PortChannel(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until a shutdown request (PID 1 powers off instead)."""
    args = parse_args(argv)
    become_subreaper()
    channel = None
    while channel is None:
        try:
            channel = open_channel(args)
        except OSError as exc:
            if os.getpid() != 1:
                raise
            # PID 1 exiting panics the kernel; the host's ping timeout is the better signal.
            log(f"cannot open the channel, retrying: {exc}")
            time.sleep(1.0)
    Agent(channel, system=not args.no_system, kill_grace=args.kill_grace).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
