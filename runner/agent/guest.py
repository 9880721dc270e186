"""The agent inside the VM: serves one host at a time over a byte channel.

Threads, each with one job:

* the main thread reads the channel, decodes requests and answers them;
  requests are handled in arrival order (an exec is spawned before the next
  request is read, so a `Cancel` can never overtake its `Exec`);
* one pump thread per exec and one reaper thread (see `runner.agent.processes`).

Every frame goes out through `Agent.send` under one lock: one writer.

When the channel loses its host (see `runner.agent.channel`) the agent waits
for a new one, sends `Hello` and starts a fresh decoder. It never exits
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
    Role,
    Shutdown,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
        boot_id = system.boot_id()
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
                system.put_file(request.path, request.data, request.mode)
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
            system.configure(req.clock_ns, req.entropy, req.hostname, req.nameservers)
        self._job_env = dict(req.env)

    def _exec(self, req: Exec) -> None:
        with self._execs_lock:
            if req.id in self._execs:
                raise ValueError(f"exec {req.id} is already running")
            execution = Execution(
                req,
                reaper=self.reaper,
                send=self.send,
                forget=self.forget,
                kill_grace=self.kill_grace,
            )
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
        try:
            system.power_off()
        except OSError as exc:
            log(f"reboot(RB_POWER_OFF) failed: {exc.strerror}")
            self._stopping = False  # PID 1 must not exit: keep serving
