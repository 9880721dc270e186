"""Secrets at rest, without VMs: what the store keeps, what a submission may carry,
and which queued jobs a restarted daemon must end.

The real-daemon tests (API, CLI, restart, QEMU argv) are in test_secrets_daemon.py.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path

import pytest

from runner.errors import ConfigError
from runner.secret import Secret
from runner.service import recovery
from runner.service.jobs import Job, JobSpec, JobState, parse_submission
from runner.service.store import Store


def canary(kind: str) -> str:
    return f"sf-canary-{kind}-{secrets.token_hex(8)}"


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose raw bytes contain ``needle``."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and needle.encode() in path.read_bytes():
                found.append(str(path.relative_to(root)))
        except FileNotFoundError:  # a VM's file, removed with its VM meanwhile
            continue
    return sorted(found)


def job_with(env: dict[str, str], secret: dict[str, str] | None = None) -> Job:
    spec = JobSpec(script="true", env=env)
    return Job(id=secrets.token_hex(5), spec=spec, profile="default",
               secret_env={k: Secret(v) for k, v in (secret or {}).items()})


async def finish(store: Store, job: Job, state: JobState = JobState.SUCCEEDED) -> None:
    await store.transition(job, JobState.STARTING)
    await store.transition(job, JobState.RUNNING)
    await store.transition(job, state, exit_code=0)


async def test_secret_env_is_never_stored_and_plain_env_leaves_when_the_job_ends(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state" / "snapfleet.db")
    await store.open()
    try:
        # Enough jobs with big values that rows overflow and pages split and get freed:
        # a value must not survive in free space, free pages or old WAL frames either.
        ended: list[tuple[Job, str, str]] = []
        live: list[tuple[Job, str, str]] = []
        for i in range(60):
            # (grepped for once: a long value is split across overflow pages)
            plain, secret = canary("plain"), canary("secret")
            job = job_with({"PLAIN": plain * (1 + i % 40), "OTHER": "x" * (i * 100)},
                           {"SECRET": secret})
            await store.add_job(job)
            (ended if i % 3 else live).append((job, plain, secret))
        for job, _, _ in ended:
            await finish(store, job, JobState.FAILED if len(job.id) % 2 else JobState.SUCCEEDED)
        state = tmp_path / "state"
        for _job, plain, secret in ended:
            assert files_holding(state, secret) == []
            assert files_holding(state, plain) == []
        for job, plain, secret in live:  # the grep sees what is there
            assert files_holding(state, secret) == []
            assert files_holding(state, plain) != []
            stored = await store.get(job.id)
            assert stored is not None
            assert stored.spec.env["PLAIN"].startswith(plain)
            assert stored.secret_env == {}
            assert stored.secret_keys == ("SECRET",)
            assert stored.secrets_lost == ("SECRET",)
        for job, plain, _ in live:
            await store.transition(job, JobState.CANCELLED, reason="cancelled by user")
            assert files_holding(state, plain) == []
        done = await store.get(ended[0][0].id)
        assert done is not None
        assert done.spec.env == {}
        assert done.public()["env_keys"] == ["OTHER", "PLAIN"]
        assert done.public()["secret_env_keys"] == ["SECRET"]
    finally:
        await store.close()
    for _job, plain, secret in ended + live:
        assert files_holding(tmp_path, plain) == files_holding(tmp_path, secret) == []


async def test_an_older_database_loses_its_finished_jobs_env_on_open(tmp_path: Path) -> None:
    db_path = tmp_path / "snapfleet.db"
    plain, queued_plain = canary("old"), canary("queued")
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, source TEXT NOT NULL, profile TEXT NOT NULL,
            spec TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
            finished_at REAL, exit_code INTEGER, reason TEXT, vm_id TEXT,
            log_bytes INTEGER NOT NULL DEFAULT 0);
    """)
    for job_id, state, value in (("old", "succeeded", plain), ("q", "queued", queued_plain)):
        spec = json.dumps({"script": "true", "env": {"K": value}})
        db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL,0)",
                   (job_id, "local", "default", spec, state, 1.0))
    db.close()
    assert files_holding(tmp_path, plain) != []
    store = Store(db_path)
    await store.open()
    try:
        assert files_holding(tmp_path, plain) == []
        old, queued = await store.get("old"), await store.get("q")
        assert old is not None
        assert old.spec.env == {}
        assert queued is not None
        assert queued.spec.env == {"K": queued_plain}
        assert queued.secret_keys == ()
        assert recovery.secrets_lost(queued) is None
    finally:
        await store.close()


def test_a_submission_splits_off_its_secret_env() -> None:
    secret = canary("secret")
    spec, secret_env = parse_submission(
        {"script": "true", "env": {"A": "1"}, "secret_env": {"TOKEN": secret}}
    )
    assert spec == JobSpec(script="true", env={"A": "1"})
    assert secret_env == {"TOKEN": Secret(secret)}
    assert secret not in spec.model_dump_json()
    assert secret not in repr(secret_env)
    assert parse_submission({"script": "true"})[1] == {}


@pytest.mark.parametrize(("secret_env", "key", "message"), [
    ("TOKEN=x", "secret_env", "valid dictionary"),
    ({"": "VALUE"}, "secret_env.", "must not be empty"),
    ({"A=B": "VALUE"}, "secret_env.A=B", "must not contain '='"),
    ({"A\0": "VALUE"}, "secret_env.A\\0", "NUL"),
    ({"A": 5}, "secret_env.A", "valid string"),
    ({"A": "VAL\0UE"}, "secret_env.A", "NUL"),
    ({"E": "VALUE"}, "secret_env.E", "also given in `env`"),
    ({"BIG": "VALUE" * 250_000}, "secret_env", "the limit is"),
])
def test_a_bad_secret_env_is_refused_without_echoing_it(
    secret_env: object, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_submission({"script": "true", "env": {"E": "1"}, "secret_env": secret_env})
    assert any(k.startswith(key) and message in m for k, m in caught.value.problems), \
        caught.value.problems
    assert "VALUE" not in str(caught.value.problems)


def test_bad_spec_and_bad_secret_env_are_both_named() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_submission({"scirpt": "true", "secret_env": {"A": 1}})
    keys = [k for k, _ in caught.value.problems]
    assert "scirpt" in keys
    assert "secret_env.A" in keys


@pytest.mark.parametrize(("secret_keys", "held", "lost"), [
    ((), {}, None),
    (("TOKEN",), {"TOKEN": "x"}, None),
    (("TOKEN",), {}, "TOKEN"),
    (("A", "B"), {"A": "x"}, "B"),
])
def test_a_queued_job_whose_secrets_a_restart_took_ends_with_the_reason(
    secret_keys: tuple[str, ...], held: dict[str, str], lost: str | None
) -> None:
    job = Job(id="j", spec=JobSpec(script="true"), profile="default", secret_keys=secret_keys,
              secret_env={k: Secret(v) for k, v in held.items()})
    reason = recovery.secrets_lost(job)
    if lost is None:
        assert reason is None
    else:
        assert reason is not None
        assert reason.startswith(recovery.SECRETS_LOST_REASON)
        assert reason.endswith(f"(secret env: {lost})")
