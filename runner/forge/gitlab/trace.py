"""A GitLab job trace without I/O: masking, section markers, offsets and resync.

`Masker` replaces secrets in a byte stream that arrives in arbitrary chunks:
a secret split across two chunks is still masked, because the masker holds
back any tail that could be the start of a secret until the next chunk (or
`Masker.flush`) decides it. Two kinds of secret: exact *phrases* (masked
variables, tokens) and *token prefixes* GitLab sends in
``features.token_mask_prefixes`` (``glpat-``…), where the prefix stays and
the token characters after it become ``[MASKED]``, as gitlab-runner does.

`TraceBuffer` is the trace as GitLab will see it: masked bytes, a size limit,
the CRC32 checksum gitlab-runner reports (``crc32:%08x``), and the offset
GitLab has acknowledged. It hands out `Patch` es to send with ``PATCH
/jobs/:id/trace`` and takes the answers back (`TraceBuffer.acknowledge`,
`TraceBuffer.resync` for a 416's ``Range``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

MASK = b"[MASKED]"
MAX_PREFIXES = 10
"""gitlab-runner honours at most ten token prefixes; so do we (``glpat-`` counts)."""
DEFAULT_PREFIXES = ("glpat-",)
TOKEN_CHARS = rb"A-Za-z0-9_.=\-"
MAX_HELD_TOKEN = 4096
"""A token longer than this is masked without waiting for its end (bounded memory)."""
DEFAULT_LIMIT = 4 * 1024 * 1024
"""gitlab-runner's default trace limit (``output_limit`` 4096 KiB)."""
DEFAULT_PATCH_SIZE = 1024 * 1024
"""Largest patch sent in one request (gitlab-runner's ``DefaultTracePatchLimit``)."""

SECTION_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def section_start(name: str, timestamp: int, header: str = "", *, collapsed: bool = False) -> bytes:
    """The marker GitLab folds a log section on, followed by its header line."""
    if not SECTION_NAME.match(name):
        raise ValueError(f"section name {name!r} must match {SECTION_NAME.pattern}")
    options = "[collapsed=true]" if collapsed else ""
    head = f"\x1b[36;1m{header}\x1b[0;m\n" if header else ""
    return f"section_start:{timestamp}:{name}{options}\r\x1b[0K{head}".encode()


def section_end(name: str, timestamp: int) -> bytes:
    """The marker that closes section ``name``."""
    if not SECTION_NAME.match(name):
        raise ValueError(f"section name {name!r} must match {SECTION_NAME.pattern}")
    return f"section_end:{timestamp}:{name}\r\x1b[0K".encode()


def _variants(phrase: str) -> set[bytes]:
    """A secret as it may appear in output: as is, and URL-encoded (in a URL)."""
    return {v.encode() for v in (phrase, quote(phrase, safe="")) if v}


class Masker:
    """Masks secrets in a chunked byte stream; see the module docstring."""

    def __init__(self, phrases: Iterable[str] = (), prefixes: Iterable[str] = ()) -> None:
        found: set[bytes] = set()
        for phrase in phrases:
            found |= _variants(phrase)
        # Longest first: at one position the longest secret wins.
        self._phrases = sorted(found, key=len, reverse=True)
        cleaned = [p.strip() for p in (*DEFAULT_PREFIXES, *prefixes)]
        unique = list(dict.fromkeys(p for p in cleaned if p))[:MAX_PREFIXES]
        self._prefixes = [p.encode() for p in unique]
        alternatives: list[bytes] = []
        if self._phrases:
            alternatives.append(b"(?P<phrase>" + b"|".join(map(re.escape, self._phrases)) + b")")
        if self._prefixes:
            alternatives.append(
                b"(?P<prefix>"
                + b"|".join(map(re.escape, sorted(self._prefixes, key=len, reverse=True)))
                + b")[" + TOKEN_CHARS + b"]+"
            )
        self._pattern = re.compile(b"|".join(alternatives)) if alternatives else None
        self._token_run = re.compile(b"[" + TOKEN_CHARS + b"]*")
        self._pending = b""
        self._swallowing = False

    def feed(self, data: bytes) -> bytes:
        """Masked output that is safe to release now; a possible secret is held back."""
        return self._process(data, final=False)

    def flush(self) -> bytes:
        """Everything still held, masked: the stream has ended."""
        return self._process(b"", final=True)

    def _process(self, data: bytes, *, final: bool) -> bytes:
        if self._swallowing:
            # The rest of an over-long token that was already masked.
            run = self._token_run.match(data)
            skip = run.end() if run else 0
            data = data[skip:]
            if not data and not final:
                return b""
            self._swallowing = False
        buf = self._pending + data
        self._pending = b""
        if self._pattern is None:
            return buf
        out: list[bytes] = []
        pos = 0
        while True:
            match = self._pattern.search(buf, pos)
            if match is None:
                break
            start, end = match.span()
            if not final and end == len(buf):
                if match.group("prefix") is None and not self._longer_phrase_may_follow(
                    buf[start:]
                ):
                    out += [buf[pos:start], MASK]
                    pos = end
                    break
                if end - start <= MAX_HELD_TOKEN:
                    # A token may go on, or a longer secret may be arriving: wait.
                    out.append(buf[pos:start])
                    self._pending = buf[start:]
                    return b"".join(out)
                out += [buf[pos:start], match.group("prefix"), MASK]
                self._swallowing = True
                return b"".join(out)
            if match.group("prefix") is not None:
                out += [buf[pos:start], match.group("prefix"), MASK]
            else:
                if not final and self._longer_phrase_may_follow(buf[start:]):
                    out.append(buf[pos:start])
                    self._pending = buf[start:]
                    return b"".join(out)
                out += [buf[pos:start], MASK]
            pos = end
        rest = buf[pos:]
        hold = 0 if final else self._partial_tail(rest)
        out.append(rest[: len(rest) - hold])
        self._pending = rest[len(rest) - hold :]
        return b"".join(out)

    def _longer_phrase_may_follow(self, tail: bytes) -> bool:
        """Whether ``tail`` (running to the end of the buffer) starts a longer secret."""
        return any(len(p) > len(tail) and p.startswith(tail) for p in self._phrases)

    def _partial_tail(self, rest: bytes) -> int:
        """Length of the longest suffix of ``rest`` that may begin a secret."""
        longest = max((len(p) for p in (*self._phrases, *self._prefixes)), default=0)
        for k in range(min(longest, len(rest)), 0, -1):
            tail = rest[-k:]
            if any(p.startswith(tail) and len(p) > k for p in self._phrases):
                return k
            if any(p.startswith(tail) for p in self._prefixes):
                return k
        return 0


@dataclass(frozen=True)
class Patch:
    """Bytes ``data`` to send at ``offset``; ``Content-Range: offset-(end-1)``."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        """The offset after the last byte."""
        return self.offset + len(self.data)

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` header value (inclusive end, as HTTP means it)."""
        return f"{self.offset}-{self.end - 1}"


class TraceResyncError(Exception):
    """GitLab claims more trace than we ever produced: the trace cannot be resumed."""


class TraceBuffer:
    """The masked trace of one job, and how much of it GitLab has."""

    def __init__(
        self,
        masker: Masker | None = None,
        *,
        limit: int = DEFAULT_LIMIT,
        patch_size: int = DEFAULT_PATCH_SIZE,
    ) -> None:
        self._masker = masker or Masker()
        self._data = bytearray()
        self._limit = limit
        self._patch_size = patch_size
        self._sent = 0
        self._crc = 0
        self._closed = False
        self._truncated = False

    @property
    def size(self) -> int:
        """Bytes in the trace so far (after masking and the limit)."""
        return len(self._data)

    @property
    def sent(self) -> int:
        """Bytes GitLab has acknowledged."""
        return self._sent

    @property
    def checksum(self) -> str:
        """gitlab-runner's checksum of the whole trace: ``crc32:%08x`` (IEEE)."""
        return f"crc32:{self._crc:08x}"

    @property
    def closed(self) -> bool:
        """True once `close` was called: nothing more will be written."""
        return self._closed

    def data(self) -> bytes:
        """The whole masked trace (what GitLab should end up holding)."""
        return bytes(self._data)

    def tail(self, start: int) -> bytes:
        """The masked trace from byte ``start`` on (what was added since ``size`` was it)."""
        return bytes(self._data[start:])

    def write(self, data: bytes) -> None:
        """Append job output; secrets are masked before they are kept."""
        if self._closed:
            raise ValueError("trace is closed")
        self._append(self._masker.feed(data))

    def close(self) -> None:
        """The job wrote its last byte: release what the masker held back."""
        if not self._closed:
            self._append(self._masker.flush())
            self._closed = True

    def _append(self, data: bytes) -> None:
        if self._truncated or not data:
            return
        room = self._limit - len(self._data)
        if len(data) > room:
            data = data[: max(room, 0)] + (
                f"\n\x1b[31;1mJob's log exceeded limit of {self._limit} bytes.\n"
                "Job execution will continue but no more output will be collected.\x1b[0;m\n"
            ).encode()
            self._truncated = True
        self._data += data
        self._crc = zlib.crc32(data, self._crc)

    def pending(self) -> int:
        """Bytes not yet acknowledged by GitLab."""
        return len(self._data) - self._sent

    def next_patch(self) -> Patch | None:
        """The next chunk to send from the acknowledged offset, or ``None``."""
        if self._sent >= len(self._data):
            return None
        end = min(len(self._data), self._sent + self._patch_size)
        return Patch(self._sent, bytes(self._data[self._sent : end]))

    def acknowledge(self, patch: Patch) -> None:
        """GitLab took ``patch`` (202)."""
        self._sent = max(self._sent, patch.end)

    def resync(self, remote_size: int) -> None:
        """GitLab answered 416 with ``Range: 0-<remote_size>``: resend from there."""
        if remote_size > len(self._data) or remote_size < 0:
            raise TraceResyncError(
                f"GitLab holds {remote_size} trace bytes, we produced {len(self._data)}"
            )
        self._sent = remote_size

    def rewind(self) -> None:
        """GitLab rejected the trace's checksum (412): send it all again."""
        self._sent = 0


def parse_range(value: str | None) -> int | None:
    """The size GitLab holds from a ``Range: 0-<size>`` header, or ``None``."""
    if not value:
        return None
    start, sep, end = value.strip().partition("-")
    if not sep or not start.isdigit() or not end.isdigit():
        return None
    return int(end)
