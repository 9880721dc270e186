"""The daemon's state in SQLite: jobs, their transitions, VM leases, log offsets.

One connection used from one worker thread, so SQLite never blocks the event
loop and never sees two threads. The file is 0600.

Secret env is never written here (only its names). Plain env is, while the job
may still run (a queued job survives a restart); when the job ends its values
are overwritten in place (``secure_delete``) and the WAL is checkpointed and
truncated, so no copy stays in the database, its WAL or its free pages.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError

from runner.service.jobs import TERMINAL, Job, JobSpec, JobState, check_transition

T = TypeVar("T")
log = structlog.get_logger("snapfleet.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    profile TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    reason TEXT,
    vm_id TEXT,
    log_bytes INTEGER NOT NULL DEFAULT 0,
    env_keys TEXT NOT NULL DEFAULT '[]',
    secret_keys TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS transitions (
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id);
CREATE TABLE IF NOT EXISTS leases (
    vm_id TEXT PRIMARY KEY,
    job_id TEXT,
    pid INTEGER,
    created_at REAL NOT NULL
);
"""

_COLUMNS = (
    "id, source, profile, spec, state, created_at, started_at, finished_at, exit_code, reason,"
    " vm_id, log_bytes, env_keys, secret_keys"
)
_ADDED_COLUMNS = {  # columns newer than the first schema, added to older databases
    "env_keys": "TEXT NOT NULL DEFAULT '[]'",
    "secret_keys": "TEXT NOT NULL DEFAULT '[]'",
}
_TERMINAL_SQL = ",".join(f"'{s}'" for s in sorted(TERMINAL))


class Store:
    """Async facade over one SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapfleet-db")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Deleted and overwritten content is zeroed, not left in free space or free pages.
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        for column, decl in _ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
        self._db = db
        # Records of finished jobs written before env was scrubbed at the end.
        with db:
            db.execute("BEGIN")
            scrubbed = db.execute(
                f"UPDATE jobs SET spec=json_set(spec, '$.env', json('{{}}'))"
                f" WHERE state IN ({_TERMINAL_SQL}) AND json_extract(spec, '$.env') != '{{}}'"
            ).rowcount
        if scrubbed:
            self._truncate_wal()

    def _truncate_wal(self) -> None:
        """Copy the WAL into the database and cut it to zero bytes: the WAL keeps old
        page images (and with them values since overwritten) until then."""
        busy, _, _ = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # another connection reads: the next finished job's checkpoint retries
            log.warning("state WAL not truncated: another connection holds it", db=str(self.path))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # -- jobs ---------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        def add() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.execute(
                    f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    _row(job),
                )
                db.execute(
                    "INSERT INTO transitions VALUES (?,?,?,?)",
                    (job.id, str(job.state), job.created_at, None),
                )

        await self._call(add)

    async def transition(
        self, job: Job, new: JobState, *, reason: str | None = None, **fields: Any
    ) -> None:
        """Move ``job`` to ``new`` (checked against the table), updating ``fields``."""
        check_transition(job.id, job.state, new)
        now = time.time()
        job.state = new
        if reason is not None:
            job.reason = reason
        for key, value in fields.items():
            setattr(job, key, value)
        if new is JobState.RUNNING and job.started_at is None:
            job.started_at = now
        if new in TERMINAL:
            job.finished_at = now

        # A finished job's plain env is no longer needed: its values leave the database.
        scrub = new in TERMINAL and bool(job.spec.env)

        def update() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.execute(
                    "UPDATE jobs SET state=?, started_at=?, finished_at=?, exit_code=?, reason=?,"
                    " vm_id=?, log_bytes=? WHERE id=?",
                    (str(job.state), job.started_at, job.finished_at, job.exit_code, job.reason,
                     job.vm_id, job.log_bytes, job.id),
                )
                if scrub:
                    db.execute("UPDATE jobs SET spec=? WHERE id=?", (_spec_json(job, env=False),
                                                                      job.id))
                db.execute(
                    "INSERT INTO transitions VALUES (?,?,?,?)", (job.id, str(new), now, reason)
                )
            if scrub:
                self._truncate_wal()

        await self._call(update)

    async def annotate(self, job: Job, note: str) -> None:
        """Add a line to a job's history without changing its state."""
        await self._call(
            self._exec, "INSERT INTO transitions VALUES (?,?,?,?)",
            (job.id, str(job.state), time.time(), note),
        )

    async def get(self, job_id: str) -> Job | None:
        rows = await self._call(self._query, f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    async def jobs(
        self, *, states: Iterable[JobState] | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, oldest first within the newest ``limit``; optionally only some states."""
        if states is None:
            sql = f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?"
            params: tuple[Any, ...] = (limit,)
        else:
            wanted = [str(s) for s in states]
            marks = ",".join("?" * len(wanted))
            sql = (f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks})"
                   " ORDER BY created_at DESC LIMIT ?")
            params = (*wanted, limit)
        rows = await self._call(self._query, sql, params)
        return [_job(row) for row in reversed(rows)]

    async def history(self, job_id: str) -> list[tuple[str, float, str | None]]:
        rows = await self._call(
            self._query, "SELECT state, at, reason FROM transitions WHERE job_id=? ORDER BY at",
            (job_id,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def forget_finished(self, before: float) -> list[str]:
        """Delete records of jobs that finished before ``before``; return their ids."""

        def forget() -> list[str]:
            db = self._conn()
            terminal = [str(s) for s in TERMINAL]
            marks = ",".join("?" * len(terminal))
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM jobs WHERE state IN ({marks}) AND finished_at < ?",
                (*terminal, before),
            )]
            with db:
                db.execute("BEGIN")
                for job_id in ids:
                    db.execute("DELETE FROM transitions WHERE job_id=?", (job_id,))
                    db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            return ids

        return await self._call(forget)

    # -- VM leases ----------------------------------------------------------

    async def lease(self, vm_id: str, job_id: str, pid: int | None) -> None:
        await self._call(
            self._exec, "INSERT OR REPLACE INTO leases VALUES (?,?,?,?)",
            (vm_id, job_id, pid, time.time()),
        )

    async def release(self, vm_id: str) -> None:
        await self._call(self._exec, "DELETE FROM leases WHERE vm_id=?", (vm_id,))

    async def leases(self) -> dict[str, tuple[str | None, int | None]]:
        rows = await self._call(self._query, "SELECT vm_id, job_id, pid FROM leases", ())
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- helpers ------------------------------------------------------------

    def _exec(self, sql: str, params: tuple[Any, ...]) -> None:
        self._conn().execute(sql, params)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return list(self._conn().execute(sql, params))


def _spec_json(job: Job, *, env: bool) -> str:
    """The spec as stored: never secret env (it is not in the spec), plain env only if
    ``env`` (while the job may still run)."""
    spec = job.spec if env or not job.spec.env else job.spec.model_copy(update={"env": {}})
    return spec.model_dump_json()


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.id, job.source, job.profile, _spec_json(job, env=job.state not in TERMINAL),
        str(job.state), job.created_at, job.started_at, job.finished_at, job.exit_code,
        job.reason, job.vm_id, job.log_bytes, json.dumps(list(job.env_keys)),
        json.dumps(list(job.secret_keys)),
    )


def _job(row: tuple[Any, ...]) -> Job:
    raw = json.loads(row[3])
    problem = None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        # Stored by an older, laxer version: list it as it is; a queued one will not run.
        spec = JobSpec.model_construct(**raw)
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return Job(
        id=row[0], source=row[1], profile=row[2], spec=spec, spec_problem=problem,
        state=JobState(row[4]), created_at=row[5], started_at=row[6], finished_at=row[7],
        exit_code=row[8], reason=row[9], vm_id=row[10], log_bytes=row[11],
        env_keys=tuple(json.loads(row[12])), secret_keys=tuple(json.loads(row[13])),
    )
