"""The real guest agent, run on the host (``--socket --no-system``), driven by AgentClient."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from runner.agent import messages as proto_messages
from runner.agent import protocol as proto
from runner.errors import AgentDisconnected, AgentError, AgentProtocolError, AgentTimeout
from runner.vm.agent_client import (
    MAX_LOGGED_PROTOCOL_ERRORS,
    OUTPUT_BUFFER_LIMIT,
    AgentClient,
    Command,
    ExecResult,
    ExecSession,
    HybridVsockTransport,
    UnixSocketTransport,
)

REPO = Path(__file__).resolve().parent.parent
KILL_GRACE = 0.5
AGENT_ARGV = [sys.executable, "-m", "runner.agent", "--no-system"]


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, pgrp, state) for every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = proc_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def group_members(pgid: int) -> list[int]:
    return [p for p, (_, pgrp, state) in proc_table().items() if pgrp == pgid and state != "Z"]


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    """A guest agent listening on a fresh unix socket; it and all it started die after."""
    directory = Path(tempfile.mkdtemp(prefix="sfa-"))  # short: sun_path is 108 bytes
    sock, log = directory / "agent.sock", directory / "agent.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [*AGENT_ARGV, "--socket", str(sock), "--kill-grace", str(KILL_GRACE)],
            cwd=directory,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield AgentProcess(proc, sock, log)
    finally:
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    c = await AgentClient.connect(UnixSocketTransport(agent.socket, timeout=10), timeout=10)
    try:
        yield c
    finally:
        await c.close()


async def collect(session: ExecSession) -> tuple[list[tuple[str, bytes]], ExecResult]:
    """All output as (stream, bytes), adjacent chunks of one stream merged, and the result."""
    chunks: list[tuple[str, bytes]] = []
    async for chunk in session:
        if chunks and chunks[-1][0] == chunk.stream:
            chunks[-1] = (chunk.stream, chunks[-1][1] + chunk.data)
        else:
            chunks.append((chunk.stream, chunk.data))
    return chunks, await session.wait()


def sh(script: str, **kw: Any) -> Command:
    return Command(argv=["sh", "-c", script], **kw)


async def run(client: AgentClient, argv: Sequence[str], **kw: Any) -> tuple[bytes, ExecResult]:
    chunks, result = await collect(await client.exec(Command(argv=argv, **kw)))
    return b"".join(data for stream, data in chunks if stream == "stdout"), result


async def first_line_pid(session: ExecSession) -> int:
    chunk = await anext(session)
    return int(chunk.data.split(b"\n")[0])


# --- exec ------------------------------------------------------------------


async def test_stdout_and_stderr_keep_arrival_order(client: AgentClient) -> None:
    # The sleeps make the order observable: with both pipes ready at once no
    # reader could tell which was written first.
    script = "echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c"
    chunks, result = await collect(await client.exec(sh(script)))
    assert chunks == [("stdout", b"a\n"), ("stderr", b"b\n"), ("stdout", b"c\n")]
    assert result == ExecResult(0, None, timed_out=False, cancelled=False)


async def test_output_streams_before_exit(client: AgentClient) -> None:
    session = await client.exec(sh("echo first; sleep 2; echo second"))
    started = time.monotonic()
    chunk = await asyncio.wait_for(anext(session), 1.5)
    assert chunk.data == b"first\n"
    assert time.monotonic() - started < 1.5
    assert not session.done
    await session.cancel()


async def test_exit_code_passes_through(client: AgentClient) -> None:
    out, result = await run(client, ["sh", "-c", "echo out; exit 3"])
    assert out == b"out\n"
    assert result == ExecResult(3, None, timed_out=False, cancelled=False)


async def test_script_runs_with_shell_and_stdin(client: AgentClient) -> None:
    session = await client.exec(
        Command(script='read line; echo "got $line from $0"', stdin=b"hi\n")
    )
    chunks, result = await collect(session)
    assert result.exit_code == 0
    assert chunks[0][1].startswith(b"got hi from /")
    out, _ = await run(client, ["cat"], stdin=b"\x00\xff raw")
    assert out == b"\x00\xff raw"


async def test_timeout_kills_the_whole_group(client: AgentClient) -> None:
    started = time.monotonic()
    session = await client.exec(sh("echo $$; sleep 30 & sleep 30", timeout=1))
    pgid = await first_line_pid(session)
    for _ in range(50):  # sh forks the sleeps after the echo
        if len(group_members(pgid)) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(group_members(pgid)) == 3
    result = await session.wait()
    assert time.monotonic() - started < 1 + KILL_GRACE + 2
    assert result == ExecResult(None, signal.SIGTERM, timed_out=True, cancelled=False)
    assert group_members(pgid) == []


async def test_timeout_escalates_to_sigkill(client: AgentClient) -> None:
    started = time.monotonic()
    session = await client.exec(sh("trap '' TERM; echo $$; sleep 30", timeout=0.5))
    pgid = await first_line_pid(session)
    result = await session.wait()
    elapsed = time.monotonic() - started
    assert 0.5 + KILL_GRACE - 0.1 < elapsed < 0.5 + KILL_GRACE + 2
    assert result == ExecResult(None, signal.SIGKILL, timed_out=True, cancelled=False)
    assert group_members(pgid) == []


async def test_cancel(client: AgentClient) -> None:
    session = await client.exec(sh("echo $$; sleep 30 & sleep 30"))
    pgid = await first_line_pid(session)
    started = time.monotonic()
    await session.cancel()
    result = await session.wait()
    assert time.monotonic() - started < 2
    assert result == ExecResult(None, signal.SIGTERM, timed_out=False, cancelled=True)
    assert group_members(pgid) == []
    await session.cancel()  # after the end: a no-op


async def test_env_from_configure_and_exec(agent: AgentProcess, client: AgentClient) -> None:
    secret = "s3cr3t-configure-value"
    await client.configure(hostname="ignored-with-no-system", env={"JOB": secret, "BOTH": "c"})
    script = 'printf "%s|%s|%s|%s" "$JOB" "$BOTH" "$ONLY" "${PATH:+path}"'
    out, _ = await run(client, ["sh", "-c", script], env={"BOTH": "e", "ONLY": "x"})
    assert out == f"{secret}|e|x|path".encode()
    out, _ = await run(client, ["sh", "-c", 'printf "%s|%s" "$JOB" "$ONLY"'])
    assert out == f"{secret}|".encode()
    await client.configure(env={})
    out, _ = await run(client, ["sh", "-c", 'printf "%s" "$JOB"'])
    assert out == b""
    assert secret not in agent.log_text()


async def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    out, _ = await run(client, ["pwd"], cwd=str(tmp_path))
    assert out.decode().strip() == str(tmp_path)


async def test_put_file(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    await client.put_file(str(target), b"\x00\xffbinary", 0o640)
    assert target.read_bytes() == b"\x00\xffbinary"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    await client.put_file(str(target), b"second", 0o755)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp left


async def test_failed_requests_get_errors_and_agent_keeps_serving(client: AgentClient) -> None:
    with pytest.raises(AgentError, match="agent error"):
        await client.put_file("/dev/null/not-a-dir/x", b"")
    session = await client.exec(Command(argv=["echo", "nul\x00byte"]))  # the guest cannot run it
    with pytest.raises(AgentError, match="ValueError"):
        await session.wait()
    out, _ = await run(client, ["echo", "still here"])
    assert out == b"still here\n"


@pytest.mark.parametrize(
    ("argv", "cwd", "code", "reason"),
    [
        (["/nonexistent/binary"], None, 127,
         "cannot start the job: /nonexistent/binary: No such file or directory"),
        (["true"], "/nonexistent/dir", 127,
         "cannot start the job: working directory /nonexistent/dir: No such file or directory"),
        (["/"], None, 126, "cannot start the job: /: Permission denied"),
    ],
)
async def test_a_job_that_cannot_start_ends_like_a_shell_says(
    client: AgentClient, argv: list[str], cwd: str | None, code: int, reason: str
) -> None:
    chunks, result = await collect(await client.exec(Command(argv=argv, cwd=cwd)))
    assert result == ExecResult(code, None, timed_out=False, cancelled=False)
    assert chunks == [("stderr", f"snapfleet: {reason}\n".encode())]
    out, _ = await run(client, ["echo", "still here"])
    assert out == b"still here\n"


async def read_events(
    reader: asyncio.StreamReader, conn: proto.Connection, count: int
) -> list[proto.Event]:
    events: list[proto.Event] = []
    while len(events) < count:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "agent closed the connection"
        conn.receive_data(data)
        while (event := conn.next_event()) is not None:
            events.append(event)
    return events


async def test_bad_frames_get_error_replies(agent: AgentProcess) -> None:
    reader, writer = await UnixSocketTransport(agent.socket, timeout=10).open()
    conn = proto.Connection(proto.Role.HOST)
    try:
        (hello,) = await read_events(reader, conn, 1)
        assert isinstance(hello, proto.Hello)
        assert hello.version == proto.PROTOCOL_VERSION
        for payload in (b'{"type": "launch", "id": 77}', b'{"type": "ping", "id": 78, "x": 1}'):
            rid = json.loads(payload)["id"]
            conn.send(proto.Ping(rid))  # our end records request rid; the guest gets garbage
            writer.write(struct.pack(">IB", len(payload) + 1, 1) + payload)
        writer.write(conn.send(proto.Ping(79)))
        events = await read_events(reader, conn, 3)
        assert events[0] == proto.Error(77, "unknown message type 'launch'")
        assert isinstance(events[1], proto.Error)
        assert events[1].id == 78
        assert "unknown field" in events[1].message
        assert events[2] == proto.Pong(79)
        # A framing error cannot be resynchronised: the agent answers and resets.
        writer.write(struct.pack(">IB", proto.MAX_FRAME_SIZE + 1, 1))
        (error,) = await read_events(reader, conn, 1)
        assert isinstance(error, proto.Error)
        assert "frame length" in error.message
        writer.write(conn.send(proto.Ping(80)))
        assert await read_events(reader, conn, 1) == [proto.Pong(80)]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_reconnect_keeps_agent_and_state(agent: AgentProcess) -> None:
    transport = UnixSocketTransport(agent.socket, timeout=10)
    first = await AgentClient.connect(transport)
    await first.configure(env={"KEPT": "yes"})
    await first.exec(sh("sleep 0.3; echo orphaned output"))  # outlives its host
    await first.close()
    for _ in range(3):  # like clones restored from one snapshot, one after another
        second = await AgentClient.connect(transport, timeout=10)
        try:
            assert second.hello is not None
            assert second.hello.id == 0
            out, result = await run(second, ["sh", "-c", 'echo "$KEPT"'])
            assert (out, result.exit_code) == (b"yes\n", 0)
            await asyncio.sleep(0.2)
            assert await second.ping() < 1
        finally:
            await second.close()


async def test_an_earlier_hosts_exec_never_talks_to_the_next_host(agent: AgentProcess) -> None:
    """Both hosts number their requests from 1: the first host's exec 2 and the
    second's exec 2 run at once, and only the second's output reaches it."""
    transport = UnixSocketTransport(agent.socket, timeout=10)
    first = await AgentClient.connect(transport)
    orphan = await first.exec(sh("sleep 0.5; echo orphan; sleep 0.2; echo orphan again"))
    await first.close()
    second = await AgentClient.connect(transport, timeout=10)
    try:
        mine = await second.exec(sh("sleep 1.2; echo mine"))
        assert mine.id == orphan.id
        out = b"".join([chunk.data async for chunk in mine])
        assert out == b"mine\n"
        assert (await mine.wait()).exit_code == 0
        assert second.protocol_errors == 0
    finally:
        await second.close()


async def test_concurrent_execs(client: AgentClient) -> None:
    started = time.monotonic()
    results = await asyncio.gather(
        *(run(client, ["sh", "-c", f"sleep 0.5; echo {i}; exit {i}"]) for i in range(5))
    )
    assert time.monotonic() - started < 2.0  # in sequence it would take 2.5 s
    for i, (out, result) in enumerate(results):
        assert out == f"{i}\n".encode()
        assert result.exit_code == i


async def test_unread_output_is_bounded_and_exact(client: AgentClient) -> None:
    size = 3 * OUTPUT_BUFFER_LIMIT
    session = await client.exec(Command(argv=["head", "-c", str(size), "/dev/zero"]))
    await asyncio.sleep(1.0)  # read nothing: the client must stop buffering
    assert session._buffered <= OUTPUT_BUFFER_LIMIT + proto.MAX_OUTPUT_DATA
    assert not session.done
    total = 0
    async for chunk in session:
        assert chunk.stream == "stdout"
        assert not chunk.data.strip(b"\0")
        total += len(chunk.data)
    assert total == size
    assert (await session.wait()).exit_code == 0


async def test_wait_without_reading_discards_output(client: AgentClient) -> None:
    size = 3 * OUTPUT_BUFFER_LIMIT
    session = await client.exec(Command(argv=["head", "-c", str(size), "/dev/zero"]))
    result = await asyncio.wait_for(session.wait(), 20)
    assert result.exit_code == 0
    assert session._buffered == 0


async def test_orphans_are_reaped(agent: AgentProcess, client: AgentClient) -> None:
    out, result = await run(client, ["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"])
    orphan = int(out)
    assert result.exit_code == 0
    assert proc_table()[orphan][0] == agent.proc.pid  # adopted: the agent is a subreaper
    await asyncio.sleep(1.5)
    assert orphan not in proc_table()  # reaped, not a zombie
    children = [state for ppid, _, state in proc_table().values() if ppid == agent.proc.pid]
    assert "Z" not in children


async def test_killing_the_agent_fails_the_session(
    agent: AgentProcess, client: AgentClient
) -> None:
    session = await client.exec(sh("echo $$; sleep 30"))
    pgid = await first_line_pid(session)
    try:
        agent.proc.kill()
        with pytest.raises(AgentDisconnected):
            await asyncio.wait_for(session.wait(), 5)
        with pytest.raises(AgentDisconnected):
            await anext(session)
        with pytest.raises(AgentDisconnected):
            await client.ping()
    finally:
        os.killpg(pgid, signal.SIGKILL)


async def test_pending_request_fails_on_disconnect(
    agent: AgentProcess, client: AgentClient
) -> None:
    agent.proc.send_signal(signal.SIGSTOP)  # the request is sent but never answered
    try:
        ping = asyncio.create_task(client.ping(timeout=10))
        await asyncio.sleep(0.2)
        agent.proc.kill()
        with pytest.raises(AgentDisconnected):
            await ping
    finally:
        agent.proc.kill()


async def test_shutdown_exits_agent_that_is_not_pid1(
    agent: AgentProcess, client: AgentClient
) -> None:
    session = await client.exec(sh("echo $$; sleep 30"))
    pgid = await first_line_pid(session)
    await client.shutdown()
    assert await asyncio.to_thread(agent.proc.wait, 5) == 0
    await asyncio.sleep(0.2)
    assert group_members(pgid) == []


# --- transports and connect --------------------------------------------------


async def test_connect_times_out_without_a_socket(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        await AgentClient.connect(UnixSocketTransport(tmp_path / "none", timeout=60), timeout=0.3)
    assert time.monotonic() - started < 2


async def test_connect_times_out_when_nobody_answers(tmp_path: Path) -> None:
    path = tempfile.mktemp(prefix="sfa-", suffix=".sock")
    server = await asyncio.start_unix_server(lambda r, w: None, path=path)
    try:
        with pytest.raises(AgentTimeout):
            await AgentClient.connect(UnixSocketTransport(path), timeout=0.5)
    finally:
        server.close()
        await server.wait_closed()
        os.unlink(path)


async def test_connect_waits_for_a_late_socket(tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="sfa-")) / "late.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def start_late() -> asyncio.subprocess.Process:
        await asyncio.sleep(0.3)
        return await asyncio.create_subprocess_exec(*AGENT_ARGV, "--socket", str(path), env=env)

    starter = asyncio.create_task(start_late())
    try:
        client = await AgentClient.connect(UnixSocketTransport(path, timeout=10), timeout=10)
        await client.close()
    finally:
        proc = await starter
        proc.kill()
        await proc.wait()
        shutil.rmtree(path.parent, ignore_errors=True)


async def test_hybrid_vsock_transport(agent: AgentProcess) -> None:
    """A fake Firecracker vsock socket: CONNECT handshake, then bytes to the agent."""
    path = tempfile.mktemp(prefix="sfa-fc-", suffix=".sock")
    seen: list[bytes] = []
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        if len(seen) == 1:  # first try: the guest is "not listening yet"
            writer.close()
            return
        writer.write(b"OK 1073741824\n")
        agent_reader, agent_writer = await UnixSocketTransport(agent.socket).open()
        for t in (pipe(reader, agent_writer), pipe(agent_reader, writer)):
            tasks.add(asyncio.create_task(t))

    server = await asyncio.start_unix_server(handle, path=path)
    try:
        client = await AgentClient.connect(HybridVsockTransport(path, 52, timeout=5), timeout=5)
        try:
            out, _ = await run(client, ["echo", "via vsock"])
            assert out == b"via vsock\n"
        finally:
            await client.close()
        assert seen == [b"CONNECT 52\n", b"CONNECT 52\n"]
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        os.unlink(path)


# --- a misbehaving agent: what the client makes of replies it did not expect ---


class FakeAgent:
    """A unix socket whose "agent" answers each request with whatever ``answer`` returns."""

    def __init__(self, path: str, answer: Any) -> None:
        self.path = path
        self.answer = answer
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeAgent:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = proto.Connection(proto.Role.GUEST)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                conn.receive_data(data)
                while (request := conn.next_event()) is not None:
                    assert isinstance(request, proto.Message)
                    if isinstance(request, proto.Ping) and request.id == 1:
                        frames = [conn.send(proto.Pong(1))]  # let connect() succeed
                    else:
                        frames = [raw_event(e) for e in self.answer(request)]
                    writer.write(b"".join(frames))
                    await writer.drain()
        writer.close()


def raw_event(event: proto.Event) -> bytes:
    """A frame for ``event`` whatever the conversation says (a guest gone wrong)."""
    if isinstance(event, proto.Output):
        return proto.encode_output(event.exec_id, event.stream, event.data)
    payload = proto_messages._encode_message(event)
    return struct.pack(">IB", len(payload) + 1, proto.FrameKind.MESSAGE) + payload


@contextlib.asynccontextmanager
async def misbehaving(answer: Any) -> AsyncIterator[AgentClient]:
    path = tempfile.mktemp(prefix="sfa-bad-", suffix=".sock")
    async with FakeAgent(path, answer):
        client = await AgentClient.connect(UnixSocketTransport(path), timeout=5)
        try:
            yield client
        finally:
            await client.close()


def exited(rid: int, code: int = 0) -> proto.Exited:
    return proto.Exited(rid, exit_code=code, signal=None, timed_out=False, cancelled=False)


async def test_a_reply_of_the_wrong_kind_fails_the_request_and_is_logged() -> None:
    def answer(request: proto.Message) -> list[proto.Event]:
        if isinstance(request, proto.Ping):
            return [proto.Ok(request.id)]  # a ping wants a pong
        return [proto.Ok(request.id)]

    async with misbehaving(answer) as client:
        with capture_logs() as logs:
            wrong_kind = r"ok for request 2 \(ping, awaiting pong\)"
            with pytest.raises(AgentProtocolError, match=wrong_kind):
                await client.ping(timeout=5)
            await client.configure(env={"SECRET": "hunter2"})  # the channel still works
        assert [(e["event"], e["request"]) for e in logs] == [("agent_protocol_error", 2)]
        assert "hunter2" not in repr(logs)
        assert client.protocol_errors == 1


async def test_replies_to_nothing_are_logged_not_dropped() -> None:
    def answer(request: proto.Message) -> list[proto.Event]:
        if isinstance(request, proto.Ping):
            return [proto.Pong(request.id)]
        return [
            proto.Output(77, proto.STDOUT, b"stray"),  # no exec 77
            exited(78),  # nor 78
            proto.Error(0, "message is not a JSON object"),  # the agent rejected something
            proto.Output(request.id, proto.STDOUT, b"real\n"),
            exited(request.id, 3),
            exited(request.id, 4),  # exited twice
            proto.Output(request.id, proto.STDOUT, b"after the end"),
        ]

    async with misbehaving(answer) as client:
        with capture_logs() as logs:
            session = await client.exec(Command(argv=["anything"]))
            chunks, result = await collect(session)
            await client.ping()  # everything sent before its pong has been read
        assert chunks == [("stdout", b"real\n")]
        assert result.exit_code == 3
        assert [(e["event"], e["request"]) for e in logs] == [
            ("agent_protocol_error", 77),
            ("agent_protocol_error", 78),
            ("agent_rejected_a_message", None),
            ("agent_protocol_error", session.id),
            ("agent_protocol_error", session.id),
        ]
        assert "which is not outstanding" in logs[-1]["reason"]


async def test_an_exec_answered_wrongly_fails_its_session() -> None:
    def answer(request: proto.Message) -> list[proto.Event]:
        if isinstance(request, proto.Exec):
            return [proto.Output(request.id, proto.STDOUT, b"partial"), proto.Pong(request.id)]
        return [proto.Pong(request.id)]

    async with misbehaving(answer) as client:
        with capture_logs():
            session = await client.exec(Command(argv=["anything"]))
            with pytest.raises(AgentProtocolError, match=r"pong for request \d+ \(exec, running\)"):
                await session.wait()
        assert session.done
        assert await client.ping() < 5  # one bad exec does not end the channel


async def test_protocol_errors_are_logged_up_to_a_limit() -> None:
    def answer(request: proto.Message) -> list[proto.Event]:
        stray: list[proto.Event] = [proto.Ok(9000 + i) for i in range(50)]
        return [*stray, proto.Pong(request.id)]

    async with misbehaving(answer) as client:
        with capture_logs() as logs:
            await client.ping()
        assert client.protocol_errors == 50
        assert len(logs) == MAX_LOGGED_PROTOCOL_ERRORS + 1  # and one line saying it stops
        assert logs[-1]["event"] == "agent_protocol_errors_muted"
