"""The guest agent's messages: typed dataclasses and their strict JSON codec.

Pure and stdlib-only (copied into guest images); `runner.agent.protocol` adds
the framing and re-exports everything here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

PROTOCOL_VERSION: Final = 1
MAX_FRAME_SIZE: Final = 1 << 20
"""Largest ``length`` accepted or produced (kind byte plus payload)."""
MAX_OUTPUT_DATA: Final = MAX_FRAME_SIZE - 1 - 5
"""Largest data in one ``Output`` frame."""
MAX_ID: Final = 0xFFFF_FFFF

STDOUT: Final = 1
STDERR: Final = 2


class AgentProtocolError(Exception):
    """A frame or message violated the protocol.

    ``message_id`` is the offending message's id when it could be read, so
    the receiver can answer with an ``Error`` for that request.
    """

    def __init__(self, reason: str, *, message_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_id = message_id


class Role(enum.Enum):
    """Which end a `Connection` is."""

    HOST = "host"
    GUEST = "guest"


# --- messages ------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Guest → host, whenever the agent (re)gains a host. ``id`` is 0."""

    TYPE: ClassVar[str] = "hello"
    SENDER: ClassVar[Role] = Role.GUEST
    id: int
    version: int
    boot_id: str


@dataclass(frozen=True)
class Ping:
    """Host → guest liveness probe; answered by `Pong` with the same id."""

    TYPE: ClassVar[str] = "ping"
    SENDER: ClassVar[Role] = Role.HOST
    id: int


@dataclass(frozen=True)
class Pong:
    """Guest → host answer to `Ping`."""

    TYPE: ClassVar[str] = "pong"
    SENDER: ClassVar[Role] = Role.GUEST
    id: int


@dataclass(frozen=True)
class Configure:
    """Host → guest after restore: wall clock, RNG reseed, hostname, job env."""

    TYPE: ClassVar[str] = "configure"
    SENDER: ClassVar[Role] = Role.HOST
    id: int
    clock_ns: int
    entropy: bytes = field(repr=False)
    hostname: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)  # secrets
    nameservers: list[str] = field(default_factory=list)
    """Resolvers for /etc/resolv.conf; empty leaves the file alone."""

    def _check(self) -> None:
        if self.clock_ns < 0:
            raise _field_error(self, "clock_ns", "must not be negative")
        for server in self.nameservers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                reason = f"{server[:40]!r} is not an address"
                raise _field_error(self, "nameservers", reason) from None


@dataclass(frozen=True)
class Ok:
    """Guest → host success reply to `Configure`, `PutFile`, `Cancel`, `Shutdown`."""

    TYPE: ClassVar[str] = "ok"
    SENDER: ClassVar[Role] = Role.GUEST
    id: int


@dataclass(frozen=True, kw_only=True)
class Command:
    """What to run in the guest: ``argv``, or ``script`` run by ``shell``.

    The one value an exec is at every layer: a job's command, `Machine.exec`,
    `AgentClient.exec`, the `Exec` message (a command with an id) and the
    guest's process runner. Checked when made: ValueError names the field.
    ``argv`` is kept as a tuple and ``env`` as a copy; ``env`` and ``stdin``
    stay out of its repr (they may hold secrets). ``env`` is merged over the
    job env of the last `Configure`; ``timeout`` (seconds) is enforced by the
    guest, which kills the process group and reports ``timed_out``.
    """

    argv: Sequence[str] | None = None
    script: str | None = None
    shell: str = "/bin/sh"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    cwd: str | None = None
    timeout: float | None = None
    stdin: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.argv is not None:
            if isinstance(self.argv, str | bytes):
                raise ValueError("argv: must be a list of strings, not one string")
            object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "env", dict(self.env))
        if (self.argv is None) == (self.script is None):
            raise ValueError("argv: exactly one of argv and script is required")
        if self.argv is not None and not self.argv:
            raise ValueError("argv: must not be empty")
        if self.argv is not None and not all(isinstance(a, str) for a in self.argv):
            raise ValueError("argv: must hold strings only")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError("env: names and values must be strings")
        if not self.shell:
            raise ValueError("shell: must not be empty")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("timeout: must be positive")


@dataclass(frozen=True)
class Exec(Command):
    """Host → guest: run a `Command`; the id names the exec (its `Output` and `Exited`)."""

    TYPE: ClassVar[str] = "exec"
    SENDER: ClassVar[Role] = Role.HOST
    id: int

    @classmethod
    def of(cls, exec_id: int, command: Command) -> Exec:
        """The message that runs ``command`` as exec ``exec_id``."""
        fields = {f.name: getattr(command, f.name) for f in dataclasses.fields(Command)}
        return cls(exec_id, **fields)


@dataclass(frozen=True)
class Output:
    """Guest → host: a chunk of an exec's stdout (1) or stderr (2), bytes exact."""

    exec_id: int
    stream: int
    data: bytes


@dataclass(frozen=True)
class Exited:
    """Guest → host: the exec ended; sent after its last `Output`."""

    TYPE: ClassVar[str] = "exited"
    SENDER: ClassVar[Role] = Role.GUEST
    id: int
    exit_code: int | None
    signal: int | None
    timed_out: bool
    cancelled: bool


@dataclass(frozen=True)
class PutFile:
    """Host → guest: write ``data`` to ``path`` atomically with ``mode``."""

    TYPE: ClassVar[str] = "put_file"
    SENDER: ClassVar[Role] = Role.HOST
    id: int
    path: str
    data: bytes = field(repr=False)  # may be a secret (a runner's JIT config)
    mode: int = 0o644

    def _check(self) -> None:
        if not self.path.startswith("/"):
            raise _field_error(self, "path", "must be absolute")
        if not 0 <= self.mode <= 0o7777:
            raise _field_error(self, "mode", "must be within 0..0o7777")


@dataclass(frozen=True)
class Cancel:
    """Host → guest: signal exec ``exec_id``'s process group (SIGKILL follows)."""

    TYPE: ClassVar[str] = "cancel"
    SENDER: ClassVar[Role] = Role.HOST
    id: int
    exec_id: int
    signal: int = 15

    def _check(self) -> None:
        _check_id(self, "exec_id", self.exec_id)
        if not 1 <= self.signal <= 64:
            raise _field_error(self, "signal", "must be within 1..64")


@dataclass(frozen=True)
class Shutdown:
    """Host → guest: sync and power off (or exit when not PID 1)."""

    TYPE: ClassVar[str] = "shutdown"
    SENDER: ClassVar[Role] = Role.HOST
    id: int


@dataclass(frozen=True)
class Error:
    """Guest → host: request ``id`` failed (0 when the id could not be read)."""

    TYPE: ClassVar[str] = "error"
    SENDER: ClassVar[Role] = Role.GUEST
    id: int
    message: str


Message = Hello | Ping | Pong | Configure | Ok | Exec | Exited | PutFile | Cancel | Shutdown | Error
Event = Message | Output

_MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, Ping, Pong, Configure, Ok, Exec, Exited, PutFile, Cancel, Shutdown, Error)
}


def _field_error(msg: Message, name: str, reason: str) -> AgentProtocolError:
    return AgentProtocolError(f"{msg.TYPE}.{name}: {reason}", message_id=msg.id)


def _check_id(msg: Message, name: str, value: int) -> None:
    if not 0 <= value <= MAX_ID:
        raise _field_error(msg, name, "must be within 0..2**32-1")


def _check_message(msg: Message) -> None:
    _check_id(msg, "id", msg.id)
    check = getattr(msg, "_check", None)
    if check is not None:
        check()


# --- JSON <-> dataclass -------------------------------------------------

_HINTS: dict[type[Message], dict[str, Any]] = {}


def _hints(cls: type[Message]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _convert(tp: Any, value: object) -> object:
    """Check ``value`` against ``tp``; return it converted, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        try:
            return _convert(inner, value)
        except TypeError as exc:
            raise TypeError(f"{exc} or null") from None
    if tp is bytes:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                pass
        raise TypeError("base64 string")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(typing.cast(float, value))
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (list, Sequence):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif origin in (dict, Mapping):
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    else:
        ok = False
    if not ok:
        raise TypeError(_type_name(tp))
    if tp is float:
        return float(typing.cast(float, value))
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (list, Sequence):
        return "list[str]"
    if origin in (dict, Mapping):
        return "dict[str, str]"
    return str(tp)


def _decode_message(payload: bytes, sender: Role) -> Message:
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentProtocolError(f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise AgentProtocolError("message is not a JSON object")
    raw_id = obj.get("id")
    msg_id = raw_id if type(raw_id) is int and 0 <= raw_id <= MAX_ID else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise AgentProtocolError("message.type: missing or not a string", message_id=msg_id)
    cls = _MESSAGE_TYPES.get(kind)
    if cls is None:
        raise AgentProtocolError(f"unknown message type {kind[:40]!r}", message_id=msg_id)
    if cls.SENDER is not sender:
        raise AgentProtocolError(
            f"message type {kind!r} is not sent by the {sender.value}", message_id=msg_id
        )
    hints = _hints(cls)
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise AgentProtocolError(f"{kind}.{f.name}: missing", message_id=msg_id)
            continue
        try:
            kwargs[f.name] = _convert(hints[f.name], obj[f.name])
        except TypeError as exc:
            reason = f"{kind}.{f.name}: expected {exc}"
            raise AgentProtocolError(reason, message_id=msg_id) from None
    extra = sorted(set(obj) - {"type"} - {f.name for f in dataclasses.fields(cls)})
    if extra:
        names = ", ".join(e[:40] for e in extra[:5])
        raise AgentProtocolError(f"{kind}: unknown field(s) {names}", message_id=msg_id)
    try:
        msg = cls(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:  # a `Command` checks itself; its reason names the field
        raise AgentProtocolError(f"{kind}.{exc}", message_id=msg_id) from None
    _check_message(msg)
    return msg


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _encode_message(msg: Message) -> bytes:
    obj: dict[str, object] = {"type": msg.TYPE, "id": msg.id}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        obj[f.name] = value
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


