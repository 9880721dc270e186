"""Running job processes: one `Execution` per exec, one `Reaper` for all.

* one pump thread per exec polls its stdout and stderr in a single selector
  loop (so chunks keep their arrival order across both pipes), enforces the
  timeout and sends `Output` then `Exited`;
* one reaper thread calls ``waitpid(-1)`` and routes each status to the exec
  that owns the pid; other pids (orphans reparented to PID 1) are just reaped.

An exec runs a `Command` and sends its events through the ``send`` callable
it is given (bound to the host session that started it); it never writes to
the channel itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO

from runner.agent.log import log
from runner.agent.protocol import STDERR, STDOUT, Command, Error, Event, Exited, Output

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 64 * 1024


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


class Execution:
    """Exec ``exec_id`` of ``command``: a process group, its pipes, its timeout, its pump thread.

    ``send`` writes one event to the host; ``done`` is called with this
    execution once it sent its last event; ``kill_grace`` is the SIGTERM to
    SIGKILL delay after a timeout or cancel.
    """

    def __init__(
        self,
        exec_id: int,
        command: Command,
        *,
        reaper: Reaper,
        send: Callable[[Event], None],
        done: Callable[[Execution], None],
        kill_grace: float,
    ) -> None:
        self.id = exec_id
        self._command = command
        self._reaper = reaper
        self._send = send
        self._done = done
        self._kill_grace = kill_grace
        self._lock = threading.Lock()
        self._status: int | None = None
        self._deadline = None if command.timeout is None else time.monotonic() + command.timeout
        self._kill_at: float | None = None
        self._killed = False
        self._timed_out = False
        self._cancelled = False
        self._script: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_closed = False
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        """Spawn the process and start the pump thread.

        A program or working directory that cannot be used ends the exec as a
        shell would (see `_refuse`); anything else raises.
        """
        req = self._command
        argv = req.argv
        if req.script is not None:
            fd, self._script = tempfile.mkstemp(prefix="snapfleet-", suffix=".sh")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(req.script)
            argv = (req.shell, self._script)
        assert argv is not None
        try:
            self._proc = self._reaper.spawn(
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
        except OSError as exc:  # no such workdir or program: the job's own failure
            self._cleanup()
            self._refuse(exc)
            return
        except BaseException:
            self._cleanup()
            raise
        proc = self._proc
        if proc.stdin is not None and req.stdin is not None:
            threading.Thread(target=_feed, args=(proc.stdin, req.stdin), daemon=True).start()
        threading.Thread(
            target=self._run, args=(proc,), name=f"exec-{self.id}", daemon=True
        ).start()

    def _refuse(self, exc: OSError) -> None:
        """End an exec that could not start as a shell would: a reason on stderr,
        then exit 127 (nothing there) or 126 (there but not runnable)."""
        try:
            what = "working directory " if exc.filename == self._command.cwd else ""
            reason = f"snapfleet: cannot start the job: {what}{exc.filename}: {exc.strerror}\n"
            self._send(Output(self.id, STDERR, reason.encode(errors="replace")))
            code = 127 if exc.errno == errno.ENOENT else 126
            self._send(Exited(self.id, exit_code=code, signal=None, timed_out=False,
                              cancelled=False))
        finally:
            self._done(self)

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
                self._kill_at = time.monotonic() + self._kill_grace
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
            self._send(Error(self.id, f"agent failed running the exec: {exc}"[:4096]))
        finally:
            self._cleanup()
            self._done(self)

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
            self._send(Output(self.id, stream, data))
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
        self._send(
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


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write a job's stdin and close it; a job that stops reading is its business."""
    with contextlib.suppress(OSError), pipe:
        pipe.write(data)


def become_subreaper() -> None:
    """Adopt orphans of our jobs even when not PID 1 (tests on the host)."""
    if os.getpid() == 1:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
