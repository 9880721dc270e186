"""Where a server listens: ``host:port`` or ``unix:/path``, parsed and bound one way.

Used by the control API, the metrics endpoint and the webhook listener. A unix
socket gets its mode (and group) before ``listen()``, so there is no moment
when other users could connect; a stale socket is replaced, a live one is an
error, and only our own socket is removed at exit.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from runner.errors import ConfigError, HostError


@dataclass(frozen=True)
class TCPListen:
    """``host:port``."""

    host: str
    port: int


@dataclass(frozen=True)
class UnixListen:
    """``unix:/path``."""

    path: Path


def parse_listen(listen: str, key: str) -> TCPListen | UnixListen | None:
    """Parse the setting ``key``; None when empty (disabled).

    ``host:port`` (IPv6 hosts in brackets: ``[::1]:9464``) or ``unix:/abs/path``.
    ConfigError naming ``key`` says what is wrong.
    """
    if listen == "":
        return None
    if listen.startswith("unix:"):
        return UnixListen(_unix_path(listen.removeprefix("unix:"), key))
    if "/" in listen or any(c.isspace() for c in listen):
        raise ConfigError(key, f"{listen!r} is neither host:port nor unix:/path")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"{listen!r} needs host:port, e.g. 127.0.0.1:9464 or 0.0.0.0:9464")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(key, f"port {port_text!r} in {listen!r} is not a number 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} in {listen!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(key, f"put the IPv6 address in {listen!r} in brackets: [addr]:port")
    elif not all(c.isalnum() or c in "-._" for c in host):
        raise ConfigError(key, f"{host!r} in {listen!r} is not a host name or address")
    return TCPListen(host, int(port_text))


def _unix_path(text: str, key: str) -> Path:
    if not text.startswith("/"):
        raise ConfigError(key, f"unix socket path {text!r} must be absolute")
    if "\0" in text:
        raise ConfigError(key, "unix socket path contains a NUL byte")
    # sun_path holds 108 bytes including the terminating NUL.
    if len(os.fsencode(text)) > 107:
        raise ConfigError(key, f"unix socket path {text!r} is longer than 107 bytes")
    if text.endswith("/"):
        raise ConfigError(key, f"unix socket path {text!r} names a directory")
    return Path(text)


def group_id(group: str | None, key: str = "daemon.api_group") -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(key, f"group {group!r} does not exist") from None


def bind_unix(path: Path, *, gid: int | None, mode: int, what: str, key: str) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode`` (and group ``gid``), in a parent
    directory created 0755. HostError if another process serves it or it cannot be had."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale(path, what, key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HostError(f"cannot serve {what} on unix:{path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    return sock


def _remove_stale(path: Path, what: str, key: str) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(key, f"{path} exists and is not a socket; refusing to replace it")
    try:
        # A unix connect is answered (or refused) at once: no thread needed.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        finally:
            probe.close()
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left behind by a process that died
        return
    raise HostError(f"{what} socket {path} is in use by another process")


def remove_own_socket(path: Path, bound: os.stat_result) -> None:
    # Only ours: a successor may already have replaced it.
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()


def describe(runner: web.AppRunner, where: TCPListen | UnixListen) -> str:
    """Where ``runner`` really listens (the real port when 0 was asked for)."""
    if isinstance(where, UnixListen):
        return f"unix:{where.path}"
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = str(addr[0]), int(addr[1])
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{where.host}:{where.port}"
