"""The agent inside the VM: serves one host at a time over a byte channel.

Threads, each with one job:

* the main thread reads the channel, decodes requests and answers them;
  requests are handled in arrival order (an exec is spawned before the next
  request is read, so a `Cancel` can never overtake its `Exec`);
* one pump thread per exec and one reaper thread (see `runner.agent.processes`).

Each host gets a `HostSession`: a fresh `Connection`, which tracks that
host's requests and execs, and the execs it started. Every frame goes out
through `Agent.send` under one lock, and only for the session that is still
the current one: an exec that outlives its host keeps running, but its
output and exit are never sent to the next host (whose ids may be the same).

When the channel loses its host (see `runner.agent.channel`) the agent waits
for a new one, sends `Hello` and starts a fresh session. It never exits
because of its channel.
"""

from __future__ import annotations

import os
import signal
import threading

from runner.agent import system
from runner.agent.channel import Channel
from runner.agent.log import log
from runner.agent.processes import Execution, Reaper
from runner.agent.protocol import (
    PROTOCOL_VERSION,
    AgentProtocolError,
    Cancel,
    Configure,
    Connection,
    Error,
    Event,
    Exec,
    Hello,
    Message,
    Ok,
    Output,
    Ping,
    Pong,
    PutFile,
    RequestState,
    Role,
    Shutdown,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_ONLY_ENV = frozenset({"PYTHONPATH"})


class HostSession:
    """One host's conversation: its protocol state and the execs it started."""

    def __init__(self) -> None:
        self.conn = Connection(Role.GUEST)
        self.execs: dict[int, Execution] = {}


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
        self._session: HostSession | None = None
        self._lock = threading.Lock()
        """Guards the session's `Connection` and every channel write."""
        self._live: set[Execution] = set()  # every exec still pumping, of any session
        # The agent's own environment, minus what only the agent needs: a job sees a
        # login-like environment (HOME of root, not the init's "/"), not PYTHONPATH.
        self._base_env = {k: v for k, v in os.environ.items() if k not in AGENT_ONLY_ENV}
        self._base_env.setdefault("PATH", DEFAULT_PATH)
        if self._base_env.get("HOME", "/") == "/":
            self._base_env["HOME"] = "/root"
        self._job_env: dict[str, str] = {}
        self._stopping = False

    def send(self, session: HostSession, message: Event) -> None:
        """Encode and write one frame of ``session``: the only way anything reaches a host.

        A frame of a session that ended is dropped (its host is gone); one the
        conversation does not allow is logged and dropped.
        """
        with self._lock:
            if session is not self._session:
                return
            try:
                frame = session.conn.send(message)
            except AgentProtocolError as exc:
                log(f"not sent: {exc}")
                return
            self.channel.write(frame)

    def serve(self) -> None:
        """Serve hosts one after another until a shutdown request."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_IGN would auto-reap
        threading.Thread(target=self.reaper.run, name="reaper", daemon=True).start()
        boot_id = system.boot_id()
        while not self._stopping:
            self.channel.wait_host()
            session = self._begin()
            try:
                self.send(session, Hello(0, PROTOCOL_VERSION, boot_id))
                while not self._stopping and (data := self.channel.read()):
                    session = self._receive(session, data)
            except Exception as exc:  # never exit over a channel or a bug: PID 1
                log(f"session failed: {type(exc).__name__}: {exc}")
            if not self._stopping:
                self.channel.drop()  # first: it wakes a writer blocked on the old host
                with self._lock:
                    self._session = None

    def _begin(self) -> HostSession:
        session = HostSession()
        with self._lock:
            self._session = session
        return session

    def _receive(self, session: HostSession, data: bytes) -> HostSession:
        """Handle, in order, every request ``data`` completes; returns the session to go on with."""
        with self._lock:
            session.conn.receive_data(data)
        while True:
            try:
                with self._lock:
                    request = session.conn.next_event()
            except AgentProtocolError as exc:
                self.send(session, Error(exc.message_id or 0, str(exc)))
                if session.conn.broken:  # the stream cannot resync: start afresh
                    return self._begin()
                continue
            if request is None:
                return session
            self._handle(session, request)

    def _handle(self, session: HostSession, request: Event) -> None:
        if isinstance(request, Output):
            return  # a GUEST connection never decodes one
        try:
            reply = self._dispatch(session, request)
        except Exception as exc:  # one bad request must not kill the agent
            self.send(session, Error(request.id, f"{type(exc).__name__}: {exc}"[:4096]))
            return
        if reply is not None:
            self.send(session, reply)
        if isinstance(request, Shutdown):
            self._power_off()

    def _dispatch(self, session: HostSession, request: Message) -> Event | None:
        match request:
            case Ping(id=rid):
                return Pong(rid)
            case Configure():
                self._configure(request)
            case Exec():
                self._exec(session, request)
                return None
            case PutFile():
                system.put_file(request.path, request.data, request.mode)
            case Cancel(exec_id=exec_id, signal=sig):
                execution = session.execs.get(exec_id)
                if execution is not None and session.conn.state(exec_id) is RequestState.RUNNING:
                    execution.cancel(sig)  # else it already ended: nothing to cancel
            case Shutdown():
                os.sync()
            case _:
                raise ValueError(f"{type(request).__name__} is not a request")
        return Ok(request.id)

    def _configure(self, req: Configure) -> None:
        if self.system:
            system.configure(req.clock_ns, req.entropy, req.hostname, req.nameservers)
        self._job_env = dict(req.env)

    def _exec(self, session: HostSession, req: Exec) -> None:
        """Start exec ``req.id`` (the connection already has it `RUNNING`)."""

        def done(execution: Execution) -> None:  # its pump thread, once it sent its last frame
            with self._lock:
                self._live.discard(execution)
                if session.execs.get(execution.id) is execution:
                    del session.execs[execution.id]

        execution = Execution(
            req.id,
            req,
            reaper=self.reaper,
            send=lambda event: self.send(session, event),
            done=done,
            kill_grace=self.kill_grace,
        )
        with self._lock:
            session.execs[req.id] = execution
            self._live.add(execution)
        try:
            execution.start({**self._base_env, **self._job_env})
        except BaseException:
            done(execution)
            raise

    def _power_off(self) -> None:
        self._stopping = True
        with self._lock:
            running = list(self._live)
        for execution in running:
            execution.cancel(signal.SIGKILL)
        if os.getpid() != 1:
            return
        try:
            system.power_off()
        except OSError as exc:
            log(f"reboot(RB_POWER_OFF) failed: {exc.strerror}")
            self._stopping = False  # PID 1 must not exit: keep serving
