"""The GitLab job source against the fake GitLab, with an in-memory daemon port (no VMs).

What is checked here is the source's own part: it asks for jobs only with a free
slot, maps the runner's tags to one profile, refuses jobs it cannot honour
without starting a VM, and reports the jobs a crashed daemon left behind.
The VM side is `tests/test_gitlab_direct.py`.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from runner.config import Settings, load_settings
from runner.errors import ConfigError
from runner.execution import Work
from runner.forge.gitlab import source as source_mod
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.config import GitLabRunnerConfig
from runner.forge.gitlab.inflight import InflightBook
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.session import JobOutcome
from runner.forge.gitlab.source import GitLabSource, JournaledTrace, SlotClaims, runner_profile
from runner.secret import Secret
from runner.service.jobs import Job, JobSpec, JobState, new_job_id
from runner.service.port import JobListener
from tests.fake_gitlab import FakeGitLab, make_job, running_fake, variable

TOKEN = "glrt-fake-runner"


class Port:
    """The daemon as a source sees it, in memory: slots are set by the test, and a
    submitted job ends at once with ``end_as`` (no VM)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.slots = 0
        self.end_as = JobState.SYSTEM_FAILURE
        self.hold = False
        """Keep submitted jobs queued until cancelled (the VM never comes)."""
        self.queued: dict[str, Job] = {}
        self.submitted: list[tuple[JobSpec, Work | None]] = []
        self.listeners: list[JobListener] = []

    async def submit(self, spec: JobSpec, *, source: str,
                     secret_env: Mapping[str, Secret] | None = None,
                     work: Work | None = None) -> Job:
        self.submitted.append((spec, work))
        job = Job(id=new_job_id(), spec=spec, profile=spec.profile or "default", source=source)
        if self.hold:
            self.queued[job.id] = job
        else:
            asyncio.get_running_loop().call_later(0.05, self._end, job)
        return job

    def _end(self, job: Job) -> None:
        job.state, job.reason = self.end_as, "ended by the test"
        for listener in self.listeners:
            listener(job)

    async def cancel(self, job_id: str) -> Job:
        job = self.queued.pop(job_id)
        self.end_as = JobState.CANCELLED
        self._end(job)
        return job

    def subscribe(self, listener: JobListener) -> None:
        self.listeners.append(listener)

    def free_slots(self, profile: str) -> int:
        return max(self.slots - len(self.queued), 0)

    def waiting(self, job_id: str) -> str | None:
        return "1 of 1 slots busy" if job_id in self.queued else None

    def job_log(self, job_id: str) -> None:
        return None


def _settings(tmp_path: Path, **profiles: Any) -> Settings:
    return load_settings(None, paths={"state_dir": tmp_path / "state",
                                      "runtime_dir": tmp_path / "run"},
                         profiles=profiles or {"default": {}, "vm": {"labels": ["microvm"]}})


def _runner(tmp_path: Path, fake_url: str, **kw: Any) -> GitLabRunnerConfig:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    fields: dict[str, Any] = {"url": fake_url, "runner_id": 7, "token_file": token,
                              "tags": ["microvm"], "check_interval_s": 0.2}
    return GitLabRunnerConfig(**{**fields, **kw})


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitLab]:
    async with running_fake(update_interval=1) as server:
        yield server


async def until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_tags_choose_the_profile_and_unserved_tags_refuse_to_start(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert runner_profile(settings, _runner(tmp_path, "http://x")) == "vm"
    assert runner_profile(settings, _runner(tmp_path, "http://x", tags=[],
                                            run_untagged=True)) == "default"
    with pytest.raises(ConfigError) as err:
        runner_profile(settings, _runner(tmp_path, "http://x", tags=["microvm", "gpu"]))
    assert "no profile's labels include all of its tags ['gpu', 'microvm']" in str(err.value)


def test_config_takes_runners_and_refuses_a_runner_twice(tmp_path: Path) -> None:
    runner = {"url": "https://gitlab.example.com", "runner_id": 3,
              "token_file": str(tmp_path / "t"), "tags": ["a"]}
    settings = load_settings(None, gitlab={"runners": [runner]})
    assert settings.gitlab.runners[0].runner_id == 3
    with pytest.raises(ConfigError) as err:
        load_settings(None, gitlab={"runners": [runner, runner]})
    assert "runner_id appears twice" in str(err.value)


async def test_asks_for_jobs_only_with_a_free_slot(tmp_path: Path, fake: FakeGitLab) -> None:
    port = Port(_settings(tmp_path))
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    job = await fake.enqueue(make_job(11, timeout=900))
    async with source.open():
        await asyncio.sleep(1.5)
        assert fake.count("POST", "/jobs/request") == 0  # no capacity: never asked
        assert job.status == "pending"
        port.slots = 1
        await until(lambda: job.status == "failed")
        port.stopping.set()
    spec, work = port.submitted[0]
    assert spec.profile == "vm"
    assert spec.timeout_s == 900 + 300 + 120  # job, after_script, archives (host_deadline_s)
    assert work is not None
    assert job.token not in spec.model_dump_json()  # the token is not in what is stored
    assert job.updates[-1]["failure_reason"] == "runner_system_failure"  # the VM never ran
    assert "ERROR: system_failure: ended by the test" in job.trace.decode()
    assert not list((tmp_path / "run" / "gitlab" / "runner-7").glob("*"))


async def test_a_job_asking_for_an_image_fails_without_a_vm(tmp_path: Path,
                                                            fake: FakeGitLab) -> None:
    port = Port(_settings(tmp_path))
    port.slots = 1
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    job = await fake.enqueue(make_job(12, image={"name": "ruby:3.3"}))
    async with source.open():
        await until(lambda: job.status == "failed")
        port.stopping.set()
    assert port.submitted == []
    assert job.updates[-1]["failure_reason"] == "script_failure"  # configuration_error, mapped
    assert "cannot honour image 'ruby:3.3'" in job.trace.decode()


async def test_jobs_left_by_a_crash_are_reported_failed_with_their_trace(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    payload = make_job(13)
    job = await fake.enqueue(payload)
    fake.queue.clear()
    job.status = "running"  # the previous daemon took it ...
    job.trace += b"output before the crash\n"  # ... and sent some of its trace
    book = InflightBook(tmp_path / "run" / "gitlab" / "runner-7")
    fd = book.take(13, Secret(payload["token"]))
    os.write(fd, b"output before the crash\nand more\n")  # the journal ran ahead of GitLab
    os.close(fd)
    assert stat.S_IMODE((book.root / "13.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(book.root.stat().st_mode) == 0o700
    port = Port(_settings(tmp_path))
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    async with source.open():
        await until(lambda: job.status == "failed")
        port.stopping.set()
    assert job.updates[-1]["failure_reason"] == "runner_system_failure"
    text = job.trace.decode()
    assert text.startswith("output before the crash\nand more\n")
    assert "it is not run again" in text
    assert not list(book.root.glob("*"))
    assert port.submitted == []


async def test_a_final_update_gitlab_refuses_at_shutdown_is_sent_at_the_next_start(
    tmp_path: Path, fake: FakeGitLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_mod, "SHUTDOWN_FINISH_S", 0.5)
    port = Port(_settings(tmp_path))
    port.slots, port.end_as = 1, JobState.TIMED_OUT
    job = await fake.enqueue(make_job(15))
    fake.fail_next("update", *[502] * 1000)  # GitLab is down for the final update
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    async with source.open():
        await until(lambda: any(r.path.endswith("/jobs/15") for r in fake.requests))
        port.slots = 0
        port.stopping.set()
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 5  # not the 900 s the update may be retried for
    assert job.status == "running"  # GitLab never heard
    assert "the runner stopped this job unexpectedly" not in job.trace.decode()

    fake.faults["update"].clear()
    port = Port(_settings(tmp_path))  # the next start
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    async with source.open():
        await until(lambda: job.status == "failed")
        port.stopping.set()
    assert job.updates[-1]["failure_reason"] == "job_execution_timeout"  # what really happened
    assert "it is not run again" not in job.trace.decode()
    assert not list((tmp_path / "run" / "gitlab" / "runner-7").glob("*"))
    assert port.submitted == []  # and it never ran again


async def test_a_job_cancelled_in_gitlab_while_queued_is_cancelled_in_the_daemon(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    port = Port(_settings(tmp_path))
    port.slots, port.hold = 1, True
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    job = await fake.enqueue(make_job(14))
    async with source.open():
        await until(lambda: bool(port.queued))
        fake.cancel(job.id)
        await until(lambda: job.status == "canceled")
        port.stopping.set()
    assert port.queued == {}  # the daemon's job was cancelled, not left to run
    assert "Snapfleet: queued for a vm VM: 1 of 1 slots busy" in job.trace.decode()
    assert job.updates[-1]["state"] == "failed"


async def test_a_journal_that_cannot_be_written_fails_that_job_only(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    port = Port(_settings(tmp_path))
    port.slots = 1
    blocker = tmp_path / "run" / "gitlab" / "runner-7"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")  # every journal write fails (a real OSError)
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    first = await fake.enqueue(make_job(21))
    async with source.open():
        await until(lambda: first.status == "failed")
        assert port.submitted == []  # never run without its journal
        blocker.unlink()  # the disk is fixed: the source still polls
        second = await fake.enqueue(make_job(22))
        await until(lambda: second.status == "failed")
        port.stopping.set()
    assert first.updates[-1]["failure_reason"] == "runner_system_failure"
    assert "cannot record this job on its disk" in first.trace.decode()
    assert len(port.submitted) == 1  # the next job ran
    assert "ERROR: system_failure: ended by the test" in second.trace.decode()


async def test_a_refused_runner_token_is_retried_after_a_long_pause(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    port = Port(_settings(tmp_path))
    port.slots = 1
    fake.runner_tokens.clear()  # GitLab refuses the token (403) ...
    source = GitLabSource(_runner(tmp_path, fake.url), port,  # type: ignore[arg-type]
                          auth_retry_s=0.5)
    async with source.open():
        await until(lambda: fake.count("POST", "/jobs/request") >= 1)
        await asyncio.sleep(0.2)
        assert source.status()[source.name]["healthy"] is False
        assert "refused the runner token" in source.status()[source.name]["unhealthy"]
        await asyncio.sleep(1.0)
        assert 2 <= fake.count("POST", "/jobs/request") <= 4  # paced, not a busy loop
        fake.runner_tokens.add(TOKEN)  # ... until it takes it again: polling resumes
        job = await fake.enqueue(make_job(23))
        await until(lambda: job.status == "failed")
        assert source.status()[source.name]["healthy"] is True
        port.stopping.set()
    assert len(port.submitted) == 1


def _orphan(tmp_path: Path, payload: dict[str, Any], journal: bytes) -> InflightBook:
    book = InflightBook(tmp_path / "run" / "gitlab" / "runner-7")
    fd = book.take(payload["id"], Secret(payload["token"]))
    os.write(fd, journal)
    os.close(fd)
    return book


async def test_the_maskers_held_back_tail_reaches_the_journal(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    payload = make_job(24, variables=[variable("SECRET", "supersecretvalue", masked=True)])
    job = await fake.enqueue(payload)
    fake.queue.clear()
    job.status = "running"  # taken
    journal = tmp_path / "journal.trace"
    async with GitLabClient(fake.url) as client:
        trace = JournaledTrace.for_job(client, JobPayload.parse(payload),
                                       update_interval_s=0.05)
        trace.journal_fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            async with trace:
                trace.write(b"done\nsupersec")  # may begin the secret: held back until close
                await trace.finish(JobOutcome.success())
        finally:
            os.close(trace.journal_fd)
    assert bytes(fake.jobs[24].trace) == b"done\nsupersec"
    assert journal.read_bytes() == bytes(fake.jobs[24].trace)  # a replay would match GitLab


async def test_an_orphan_whose_journal_lacks_gitlabs_tail_is_dropped_not_retried_forever(
    tmp_path: Path, fake: FakeGitLab
) -> None:
    payload = make_job(25)
    job = await fake.enqueue(payload)
    fake.queue.clear()
    job.status = "running"
    job.trace += b"journaled\nnot journaled\n"  # GitLab got bytes the journal never did
    book = _orphan(tmp_path, payload, b"journaled\n")
    port = Port(_settings(tmp_path))
    source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
    started = time.monotonic()
    async with source.open():
        await until(lambda: not list(book.root.glob("*")))
        port.stopping.set()
    assert time.monotonic() - started < 10  # not ORPHAN_FINISH_S of 416s
    assert bytes(job.trace) == b"journaled\nnot journaled\n"  # nothing resent over it
    assert job.updates[-1]["state"] == "failed"  # the final state was still offered
    assert fake.count("PATCH", "/jobs/25/trace") <= 1


async def test_an_orphan_gitlab_never_takes_is_dropped_after_a_few_starts(
    tmp_path: Path, fake: FakeGitLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_mod, "ORPHAN_FINISH_S", 0.3)
    monkeypatch.setattr(source_mod, "ORPHAN_ATTEMPTS", 2)
    payload = make_job(26)
    job = await fake.enqueue(payload)
    fake.queue.clear()
    job.status = "running"
    book = _orphan(tmp_path, payload, b"")
    fake.fail_next("update", *[502] * 1000)
    fake.fail_next("trace", *[502] * 1000)
    for start in (1, 2):
        port = Port(_settings(tmp_path))
        source = GitLabSource(_runner(tmp_path, fake.url), port)  # type: ignore[arg-type]
        async with source.open():
            if start == 1:
                await until(lambda: book.orphans() and book.orphans()[0].attempts == 1)
            else:
                await until(lambda: not list(book.root.glob("*")))
            port.stopping.set()
    assert job.status == "running"  # left to GitLab's timeout, not retried at every start


async def test_two_runners_on_one_profile_never_take_the_same_slot(tmp_path: Path) -> None:
    fake = FakeGitLab(update_interval=1, long_poll_s=5.0)  # GitLab holds each request
    await fake.start()
    try:
        port = Port(_settings(tmp_path))
        port.slots, port.hold = 1, True
        claims = SlotClaims()  # as runner.compose shares it
        sources = [GitLabSource(_runner(tmp_path, fake.url, runner_id=n), port,  # type: ignore[arg-type]
                                claims=claims) for n in (7, 8)]
        async with sources[0].open(), sources[1].open():
            await asyncio.sleep(0.5)  # both would be in a long poll now
            first = await fake.enqueue(make_job(27))
            second = await fake.enqueue(make_job(28))
            await until(lambda: len(port.submitted) >= 1)
            await asyncio.sleep(1.0)
            assert len(port.submitted) == 1  # one slot: one job taken
            assert [first.status, second.status].count("pending") == 1
            port.stopping.set()
            for job_id in list(port.queued):
                await port.cancel(job_id)
    finally:
        await fake.stop()
    assert fake.violations == []
