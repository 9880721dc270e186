"""The agent inside the VM: serves one host at a time over a byte channel.

Threads, each with one job:

* the main thread reads the channel, decodes requests and answers them;
  requests are handled in arrival order (an exec is spawned before the next
  request is read, so a `Cancel` can never overtake its `Exec`);
* one pump thread per exec polls its stdout and stderr in a single selector
  loop (so chunks keep their arrival order across both pipes), enforces the
  timeout and sends `Output` then `Exited`;
* one reaper thread calls ``waitpid(-1)`` and routes each status to the exec
  that owns the pid; other pids (orphans reparented to PID 1) are just reaped.

Every frame goes out through `Agent.send` under one lock: one writer.

The channel may lose its host at any time (a snapshot restored into a new
QEMU process, a host-side reconnect). Then reads return EOF: the agent waits a
few milliseconds, waits for a host again, sends `Hello` and starts a fresh
decoder. It never exits because of its channel.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from runner.agent.protocol import (
    PROTOCOL_VERSION,
    STDERR,
    STDOUT,
    AgentProtocolError,
    Cancel,
    Configure,
    Connection,
    Error,
    Event,
    Exec,
    Exited,
    Hello,
    Message,
    Ok,
    Output,
    Ping,
    Pong,
    PutFile,
    Role,
    Shutdown,
)

PORT_NAME = "org.snapfleet.agent"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RB_POWER_OFF = 0x4321FEDC
PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 64 * 1024
RECONNECT_DELAY = 0.008


def log(message: str) -> None:
    """One line to stderr (the serial console in a VM). Never pass env values."""
    print(f"snapfleet-agent: {message}", file=sys.stderr, flush=True)


# --- channels -----------------------------------------------------------


class Channel:
    """A byte stream to the host that can lose its host and gain a new one."""

    def wait_host(self) -> None:
        """Block until a host is (probably) there."""

    def read(self) -> bytes:
        """Block for data; ``b""`` means the host went away."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Write all of ``data``; may block until a host reads it."""
        raise NotImplementedError

    def drop(self) -> None:
        """Forget the current host after EOF."""


class PortChannel(Channel):
    """A virtio-serial port (``/dev/vportNpM``).

    With no host connected, read() returns 0 at once, poll() reports POLLHUP
    and write() blocks until a host connects.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def wait_host(self) -> None:
        while any(ev & select.POLLHUP for _, ev in self._poll.poll(0)):
            time.sleep(RECONNECT_DELAY)

    def read(self) -> bytes:
        try:
            return os.read(self._fd, READ_CHUNK)
        except OSError as exc:
            log(f"port read failed: {exc}")
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            log(f"port write failed, frame dropped: {exc}")

    def drop(self) -> None:
        time.sleep(RECONNECT_DELAY)


class SocketChannel(Channel):
    """A stream socket; for tests on the host (unix) or Firecracker (vsock).

    ``listener`` set: accept one host at a time. Otherwise ``connect`` is
    called (and retried) to reach a listening host.
    """

    def __init__(
        self,
        listener: socket.socket | None = None,
        connect: Callable[[], socket.socket] | None = None,
    ) -> None:
        self._listener = listener
        self._connect = connect
        self._conn: socket.socket | None = None
        self._cond = threading.Condition()

    def wait_host(self) -> None:
        conn = None
        while conn is None:
            try:
                if self._listener is not None:
                    conn, _ = self._listener.accept()
                elif self._connect is not None:
                    conn = self._connect()
            except OSError:
                time.sleep(0.1)
        with self._cond:
            self._conn = conn
            self._cond.notify_all()

    def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        try:
            return conn.recv(READ_CHUNK)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        with self._cond:
            while self._conn is None:
                self._cond.wait()
            # A frame for a host that just left is dropped, like its session.
            with contextlib.suppress(OSError):
                self._conn.sendall(data)

    def drop(self) -> None:
        conn = self._conn
        if conn is None:
            return
        # shutdown() first wakes a writer blocked in sendall() on this socket.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        with self._cond:
            conn.close()
            self._conn = None


def find_port(name: str = PORT_NAME) -> str | None:
    """The ``/dev/vportNpM`` whose virtio-serial name is ``name``, if any."""
    for name_file in sorted(Path("/sys/class/virtio-ports").glob("vport*/name")):
        with contextlib.suppress(OSError):
            if name_file.read_text().strip() == name:
                return f"/dev/{name_file.parent.name}"
    return None


# --- reaping --------------------------------------------------------------


class Reaper:
    """Reaps every child (orphans too, as PID 1) and routes statuses by pid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, Callable[[int], None]] = {}
        self._wake = threading.Event()

    def spawn(
        self, start: Callable[[], subprocess.Popen[bytes]], on_exit: Callable[[int], None]
    ) -> subprocess.Popen[bytes]:
        """Start a child and register its exit callback before it can be reaped."""
        with self._lock:  # the reaper routes under this lock: no status is lost
            proc = start()
            self._owners[proc.pid] = on_exit
        self._wake.set()
        return proc

    def run(self) -> None:
        """Reaper thread body; never returns."""
        while True:
            self._wake.clear()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children now; an orphan or a new exec ends the wait.
                self._wake.wait(1.0)
                continue
            with self._lock:
                owner = self._owners.pop(pid, None)
            if owner is not None:
                owner(status)


# --- execs ----------------------------------------------------------------


class Execution:
    """One exec: a process group, its pipes, its timeout and its pump thread."""

    def __init__(self, agent: Agent, request: Exec) -> None:
        self.id = request.id
        self._agent = agent
        self._request = request
        self._lock = threading.Lock()
        self._status: int | None = None
        self._deadline = None if request.timeout is None else time.monotonic() + request.timeout
        self._kill_at: float | None = None
        self._killed = False
        self._timed_out = False
        self._cancelled = False
        self._script: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_closed = False
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        """Spawn the process (raises on failure) and start the pump thread."""
        req = self._request
        argv = req.argv
        if req.script is not None:
            fd, self._script = tempfile.mkstemp(prefix="snapfleet-", suffix=".sh")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(req.script)
            argv = [req.shell, self._script]
        assert argv is not None
        try:
            self._proc = self._agent.reaper.spawn(
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL if req.stdin is None else subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env={**env, **req.env},
                    cwd=req.cwd,
                    start_new_session=True,
                ),
                self._on_exit,
            )
        except BaseException:
            self._cleanup()
            raise
        proc = self._proc
        if proc.stdin is not None and req.stdin is not None:
            threading.Thread(target=_feed, args=(proc.stdin, req.stdin), daemon=True).start()
        threading.Thread(
            target=self._run, args=(proc,), name=f"exec-{self.id}", daemon=True
        ).start()

    def cancel(self, sig: int) -> None:
        """Signal the process group now; SIGKILL follows after the grace period."""
        with self._lock:
            self._cancelled = True
        self._terminate(sig)

    def _terminate(self, sig: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)
        with self._lock:
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self._agent.kill_grace
        self._poke()

    def _on_exit(self, status: int) -> None:  # reaper thread
        assert self._proc is not None
        self._proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen off waitpid
        with self._lock:
            self._status = status
        self._poke()

    def _poke(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if not self._wake_closed:  # never write to a closed (maybe reused) fd
                os.write(self._wake_w, b"!")

    def _run(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            self._pump(proc)
            self._finish()
        except Exception as exc:  # the agent must outlive any one exec
            log(f"exec {self.id} failed: {type(exc).__name__}")
            self._kill()
            self._agent.send(Error(self.id, f"agent failed running the exec: {exc}"[:4096]))
        finally:
            self._cleanup()
            self._agent.forget(self.id)

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        assert proc.stderr is not None
        pipes = {proc.stdout.fileno(): STDOUT, proc.stderr.fileno(): STDERR}
        with selectors.DefaultSelector() as sel:
            for fd, stream in pipes.items():
                sel.register(fd, selectors.EVENT_READ, stream)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            while True:
                with self._lock:
                    status, kill_at = self._status, self._kill_at
                if status is not None and (not pipes or self._killed):
                    break
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline and kill_at is None:
                    self._timed_out = True
                    self._terminate(signal.SIGTERM)
                    continue
                if kill_at is not None and now >= kill_at and not self._killed:
                    self._kill()
                    continue
                timer = kill_at if kill_at is not None else self._deadline
                timer = None if self._killed else timer
                timeout = None if timer is None else max(0.0, timer - now)
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 512)
                    elif not self._forward(key.fd, key.data):
                        sel.unregister(key.fd)
                        del pipes[key.fd]
            # Killed with the pipes still open (a process left the group):
            # send what is already buffered, then stop.
            for fd, stream in pipes.items():
                os.set_blocking(fd, False)
                with contextlib.suppress(BlockingIOError):
                    while self._forward(fd, stream):
                        pass

    def _forward(self, fd: int, stream: int) -> bool:
        data = os.read(fd, READ_CHUNK)
        if data:
            self._agent.send(Output(self.id, stream, data))
        return bool(data)

    def _kill(self) -> None:
        self._killed = True
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _finish(self) -> None:
        if self._kill_at is not None:
            self._kill()  # whatever of the group outlived SIGTERM goes too
        status = self._status
        assert status is not None
        code = os.waitstatus_to_exitcode(status)
        self._agent.send(
            Exited(
                self.id,
                exit_code=code if code >= 0 else None,
                signal=-code if code < 0 else None,
                timed_out=self._timed_out,
                cancelled=self._cancelled,
            )
        )

    def _cleanup(self) -> None:
        with self._lock:
            if not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
        if self._proc is not None:
            for pipe in (self._proc.stdout, self._proc.stderr):
                if pipe is not None:
                    pipe.close()
        if self._script is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._script)


# --- the agent --------------------------------------------------------------


class Agent:
    """Serves requests from whichever host is on ``channel``.

    ``system=False`` never touches the clock, RNG or hostname (for running on
    a developer's host); configure then only records the job env.
    """

    def __init__(self, channel: Channel, *, system: bool = True, kill_grace: float = 2.0) -> None:
        self.channel = channel
        self.system = system
        self.kill_grace = kill_grace
        self.reaper = Reaper()
        self._proto = Connection(Role.GUEST)
        self._send_lock = threading.Lock()
        self._execs: dict[int, Execution] = {}
        self._execs_lock = threading.Lock()
        self._base_env = dict(os.environ)
        self._base_env.setdefault("PATH", DEFAULT_PATH)
        self._job_env: dict[str, str] = {}
        self._stopping = False

    def send(self, message: Event) -> None:
        """Encode and write one frame; the only way anything reaches the host."""
        frame = self._proto.send(message)
        with self._send_lock:
            self.channel.write(frame)

    def forget(self, exec_id: int) -> None:
        """Drop a finished exec from the table (called by its pump thread)."""
        with self._execs_lock:
            self._execs.pop(exec_id, None)

    def serve(self) -> None:
        """Serve hosts one after another until a shutdown request."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_IGN would auto-reap
        threading.Thread(target=self.reaper.run, name="reaper", daemon=True).start()
        boot_id = _boot_id()
        while not self._stopping:
            self.channel.wait_host()
            self._proto = Connection(Role.GUEST)  # a new host starts a new stream
            try:
                self.send(Hello(0, PROTOCOL_VERSION, boot_id))
                while not self._stopping and (data := self.channel.read()):
                    self._receive(data)
            except Exception as exc:  # never exit over a channel or a bug: PID 1
                log(f"session failed: {type(exc).__name__}: {exc}")
            if not self._stopping:
                self.channel.drop()

    def _receive(self, data: bytes) -> None:
        while True:
            try:
                events = self._proto.receive_data(data)
            except AgentProtocolError as exc:
                self.send(Error(exc.message_id or 0, str(exc)))
                if self._proto.broken:
                    self._proto = Connection(Role.GUEST)
                    return
                data = b""
                continue
            for event in events:
                self._handle(event)
            return

    def _handle(self, request: Event) -> None:
        if isinstance(request, Output):
            return  # a GUEST connection never decodes one
        try:
            reply = self._dispatch(request)
        except Exception as exc:  # one bad request must not kill the agent
            self.send(Error(request.id, f"{type(exc).__name__}: {exc}"[:4096]))
            return
        if reply is not None:
            self.send(reply)
        if isinstance(request, Shutdown):
            self._power_off()

    def _dispatch(self, request: Message) -> Event | None:
        match request:
            case Ping(id=rid):
                return Pong(rid)
            case Configure():
                self._configure(request)
            case Exec():
                self._exec(request)
                return None
            case PutFile():
                _put_file(request.path, request.data, request.mode)
            case Cancel(exec_id=exec_id, signal=sig):
                with self._execs_lock:
                    execution = self._execs.get(exec_id)
                if execution is not None:  # already finished: nothing to cancel
                    execution.cancel(sig)
            case Shutdown():
                os.sync()
            case _:
                raise ValueError(f"{type(request).__name__} is not a request")
        return Ok(request.id)

    def _configure(self, req: Configure) -> None:
        if self.system:
            time.clock_settime_ns(time.CLOCK_REALTIME, req.clock_ns)
            if req.entropy:
                _add_entropy(req.entropy)
            if req.hostname is not None:
                socket.sethostname(req.hostname)
        self._job_env = dict(req.env)

    def _exec(self, req: Exec) -> None:
        with self._execs_lock:
            if req.id in self._execs:
                raise ValueError(f"exec {req.id} is already running")
            execution = Execution(self, req)
            self._execs[req.id] = execution
        try:
            execution.start({**self._base_env, **self._job_env})
        except BaseException:
            self.forget(req.id)
            raise

    def _power_off(self) -> None:
        self._stopping = True
        with self._execs_lock:
            running = list(self._execs.values())
        for execution in running:
            execution.cancel(signal.SIGKILL)
        if os.getpid() != 1:
            return
        libc = ctypes.CDLL(None, use_errno=True)  # find_library() would spawn ldconfig
        if libc.reboot(RB_POWER_OFF) != 0:
            log(f"reboot(RB_POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
            self._stopping = False  # PID 1 must not exit: keep serving


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write a job's stdin and close it; a job that stops reading is its business."""
    with contextlib.suppress(OSError), pipe:
        pipe.write(data)


def _put_file(path: str, data: bytes, mode: int) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _add_entropy(entropy: bytes) -> None:
    """Mix host entropy into the kernel pool, credit it, and reseed the CRNG now.

    Crediting alone is not enough once the CRNG is initialised: the kernel only
    reseeds on its own schedule (up to a minute later), so clones restored from
    one snapshot would keep producing the same random bytes until then.
    """
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())


def become_subreaper() -> None:
    """Adopt orphans of our jobs even when not PID 1 (tests on the host)."""
    if os.getpid() == 1:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
