"""GitLab's runner API client and session loops against a fake GitLab (a real local server)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.errors import ForgeAuthError, JobPayloadError
from runner.forge.gitlab.client import FEATURES, GitLabClient
from runner.forge.gitlab.payload import JobPayload, When
from runner.forge.gitlab.poller import JobPoller
from runner.forge.gitlab.session import Backoff, JobOutcome, TraceStream, supported_failure_reason
from runner.forge.gitlab.trace import Masker, TraceBuffer, section_end, section_start
from runner.forge.gitlab.transfer import download_dependencies, upload_artifact
from runner.secret import Secret
from tests.fake_gitlab import FakeGitLab, make_job, running_fake, variable

RUNNER = Secret("glrt-fake-runner")


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    async with running_fake(update_interval=0) as fake:
        yield fake


@pytest.fixture
async def client(gitlab: FakeGitLab) -> AsyncIterator[GitLabClient]:
    async with GitLabClient(gitlab.url) as c:
        yield c


class Sleeps:
    """Records every sleep the code under test asks for and yields instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


# -- the payload ---------------------------------------------------------------


def test_payload_parses_a_real_looking_job_and_hides_secrets() -> None:
    raw = make_job(7, variables=[variable("DEPLOY_KEY", "hunter2hunter2", masked=True),
                                 variable("CONF", "a=1\n", file=True)],
                   artifacts=[{"name": "out", "untracked": False, "paths": ["dist/"],
                               "exclude": None, "when": None, "artifact_type": "archive",
                               "artifact_format": "zip", "expire_in": "1 week"}])
    job = JobPayload.parse(json.dumps(raw).encode())
    assert job.id == 7
    assert job.token.reveal() == raw["token"]
    assert job.git_info.refspecs
    assert job.git_info.depth == 20
    assert job.steps[0].name == "script"
    assert job.steps[0].when is When.ON_SUCCESS
    assert job.artifacts[0].when is When.ON_SUCCESS
    assert job.artifacts[0].exclude == []
    assert job.image is None
    assert job.services == []
    assert job.timeout_s == 3600
    assert job.variable("CONF") == "a=1\n"
    assert "hunter2hunter2" in job.masked_values()
    assert raw["token"] in job.masked_values()
    text = repr(job)
    assert raw["token"] not in text
    assert "hunter2hunter2" not in text


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"id": 5, "token": "t", "steps": [{"name": "script", "timeout": -1}]}),
         "steps.0.timeout"),
        (json.dumps({"id": 5, "token": "t", "steps": [{"name": "script", "when": "later"}]}),
         "steps.0.when"),
        (json.dumps({"token": "t"}), "id"),
    ],
)
def test_bad_payload_is_one_clear_line(raw: bytes | str, needle: str) -> None:
    with pytest.raises(JobPayloadError) as info:
        JobPayload.parse(raw)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    if b'"id": 5' in (raw if isinstance(raw, bytes) else raw.encode()):
        assert info.value.job_id == 5
        assert isinstance(info.value.job_token, Secret)


def test_failure_reasons_fall_back_as_gitlab_runner_does() -> None:
    assert supported_failure_reason("script_failure", []) == "script_failure"
    assert supported_failure_reason("configuration_error", []) == "script_failure"
    assert supported_failure_reason("image_pull_failure", []) == "runner_system_failure"
    assert supported_failure_reason("image_pull_failure", ["image_pull_failure"]) == (
        "image_pull_failure"
    )
    assert supported_failure_reason("job_canceled", []) == "unknown_failure"


# -- trace, pure ------------------------------------------------------------------


def test_trace_buffer_checksum_offsets_and_resync() -> None:
    buf = TraceBuffer(Masker(["s3cret-value"]), patch_size=8)
    buf.write(b"hello s3cr")
    buf.write(b"et-value world\n")
    buf.close()
    assert buf.data() == b"hello [MASKED] world\n"
    assert buf.checksum == f"crc32:{zlib.crc32(buf.data()):08x}"
    first = buf.next_patch()
    assert first is not None
    assert first.content_range == "0-7"
    assert first.data == b"hello [M"
    buf.acknowledge(first)
    second = buf.next_patch()
    assert second is not None
    assert second.offset == 8
    buf.resync(3)  # GitLab lost bytes: resend from where it is
    third = buf.next_patch()
    assert third is not None
    assert third.offset == 3


def test_section_markers_have_gitlabs_shape() -> None:
    assert section_start("step_script", 1700000000, "Executing step") == (
        b"section_start:1700000000:step_script\r\x1b[0K\x1b[36;1mExecuting step\x1b[0;m\n"
    )
    assert section_end("step_script", 1700000001) == b"section_end:1700000001:step_script\r\x1b[0K"
    with pytest.raises(ValueError, match="section name"):
        section_start("bad name", 1)


# Cases in the spirit of gitlab-runner's masking tests; "|" splits chunks.
MASK_CASES = [
    ("glpat|-imperdiet Lorem gl|pat-imperdiet in", "glpat-[MASKED] Lorem glpat-[MASKED] in", ()),
    ("glpat| -imperdiet Lorem", "glpat -imperdiet Lorem", ()),
    ("xglpat-impglpat-erdiet=_-. end", "xglpat-[MASKED] end", ()),
    ("Lorglpat- ipsu", "Lorglpat- ipsu", ()),
    ("a tok-ab|cd b glpat-x|y", "a tok-[MASKED] b glpat-[MASKED]", ("tok-",)),
    ("mask11-|abc mask9-z", "mask11-abc mask9-[MASKED]", tuple(f"mask{i}-" for i in range(1, 12))),
    ("pw=S3cr|3tV|alue!", "pw=[MASKED]!", ()),
    ("url S3cr3tV%21x", "url [MASKED]x", ()),
    ("near S3cr3tVal miss", "near S3cr3tVal miss", ()),
]


@pytest.mark.parametrize(("text", "expected", "prefixes"), MASK_CASES)
@pytest.mark.parametrize("split", [True, False])
def test_masking_across_chunk_boundaries(
    text: str, expected: str, prefixes: tuple[str, ...], split: bool
) -> None:
    masker = Masker(["S3cr3tValue", "S3cr3tV!"], prefixes)
    parts = text.split("|") if split else [text.replace("|", "")]
    out = b"".join(masker.feed(p.encode()) for p in parts) + masker.flush()
    assert out.decode() == expected


def test_masking_byte_by_byte_never_leaks_a_prefix_of_the_secret() -> None:
    secret = "hunter2-is-long-secret"
    masker = Masker([secret])
    released = b""
    for ch in f"before {secret} after".encode():
        released += masker.feed(bytes([ch]))
        assert b"hunter2-is" not in released
    released += masker.flush()
    assert released == b"before [MASKED] after"


# -- polling ------------------------------------------------------------------


async def test_idle_polling_without_long_poll_is_paced(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    poller = JobPoller(client, RUNNER, system_id="s_test", check_interval_s=0.25)
    task = asyncio.create_task(poller.next_job())
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    polls = gitlab.count("POST", "/jobs/request")
    assert 3 <= polls <= 6, polls  # ~1 per 0.25 s, not a busy loop


async def test_long_poll_carries_last_update_and_wakes_on_a_new_job(
    client: GitLabClient,
) -> None:
    fake = FakeGitLab(long_poll_s=0.6)
    await fake.start()
    try:
        async with GitLabClient(fake.url) as c:
            poller = JobPoller(c, RUNNER, system_id="s_test", check_interval_s=0.0)
            task = asyncio.create_task(poller.next_job())
            await asyncio.sleep(1.5)
            idle_polls = fake.count("POST", "/jobs/request")
            started = time.monotonic()
            await fake.enqueue(make_job(11))
            job = await asyncio.wait_for(task, 5)
            assert job.id == 11
            assert time.monotonic() - started < 0.3  # the held request answered at once
        # 1 immediate (no cursor yet) + one held request per 0.6 s, never a spin.
        assert 2 <= idle_polls <= 4, idle_polls
        bodies = [json.loads(r.body) for r in fake.requests if r.path.endswith("/jobs/request")]
        assert "last_update" not in bodies[0]
        assert all(b["last_update"] == "1" for b in bodies[1:])
        assert all(b["info"]["features"] == dict(FEATURES) for b in bodies)
        assert fake.violations == []
    finally:
        await fake.stop()


async def test_request_retries_5xx_and_429_with_growing_jittered_backoff(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    await gitlab.enqueue(make_job(21))
    gitlab.fail_next("request", 500, 502, 429, 503)
    sleeps = Sleeps()
    poller = JobPoller(client, RUNNER, system_id="s_test", sleep=sleeps, rng=random.Random(1))
    job = await poller.next_job()
    assert job.id == 21
    assert gitlab.count("POST", "/jobs/request") == 5
    assert len(sleeps.delays) == 4
    assert all(d > 0 for d in sleeps.delays)
    assert sleeps.delays[3] > sleeps.delays[0]  # backoff grows
    assert len(set(sleeps.delays)) == 4  # with jitter


async def test_rejected_runner_token_is_an_auth_error(client: GitLabClient) -> None:
    poller = JobPoller(client, Secret("glrt-wrong"), system_id="s_test")
    with pytest.raises(ForgeAuthError, match="403"):
        await poller.next_job()


async def test_malformed_job_is_failed_and_polling_goes_on(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    bad = make_job(31, steps=[{"name": "script", "script": ["true"], "when": "sometimes"}])
    bad_job = await gitlab.enqueue(bad)
    await gitlab.enqueue(make_job(32))
    poller = JobPoller(client, RUNNER, system_id="s_test", check_interval_s=0.0)
    job = await asyncio.wait_for(poller.next_job(), 10)
    assert job.id == 32
    assert bad_job.status == "failed"
    assert bad_job.updates[-1]["failure_reason"] == "runner_system_failure"
    assert b"cannot run this job" in bad_job.trace
    assert b"steps.0.when" in bad_job.trace


async def test_verify(gitlab: FakeGitLab, client: GitLabClient) -> None:
    assert await client.verify(RUNNER, system_id="s_x") == 77
    with pytest.raises(ForgeAuthError):
        await client.verify(Secret("glrt-nope"), system_id="s_x")


# -- one job's trace ------------------------------------------------------------


async def _take(gitlab: FakeGitLab, client: GitLabClient, **kw: object) -> JobPayload:
    await gitlab.enqueue(make_job(kw.pop("job_id", 41), **kw))  # type: ignore[arg-type]
    return await JobPoller(client, RUNNER, system_id="s_test").next_job()


async def test_trace_streams_masked_chunks_and_final_update_checksum(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    secret = "Pa55-w0rd-of-the-deploy"
    job = await _take(gitlab, client, variables=[variable("DEPLOY", secret, masked=True)])
    async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
        trace.section_start("step_script", "Executing step_script")
        for piece in ("token is Pa55-w0", "rd-of-", "the-deploy and CI_JOB_TOKEN=",
                      job.token.reveal()[:9], job.token.reveal()[9:] + "\n"):
            trace.write(piece.encode())
            await asyncio.sleep(0.08)  # let each piece go out on its own patch
        trace.section_end("step_script")
        await trace.finish(JobOutcome.failed("script_failure", exit_code=3))
    fake_job = gitlab.jobs[job.id]
    text = bytes(fake_job.trace)
    assert secret.encode() not in text
    assert job.token.reveal().encode() not in text
    assert b"token is [MASKED] and CI_JOB_TOKEN=[MASKED]\n" in text
    assert text.startswith(b"section_start:")
    assert b"section_end:" in text
    assert gitlab.count("PATCH", "/trace") >= 3  # really streamed in chunks
    final = fake_job.updates[-1]
    assert final["state"] == "failed"
    assert final["failure_reason"] == "script_failure"
    assert final["exit_code"] == 3
    assert final["output"] == {"checksum": f"crc32:{zlib.crc32(text):08x}",
                               "bytesize": len(text)}
    assert fake_job.status == "failed"
    # No request ever carried a secret outside the headers/body that must.
    for rec in gitlab.requests:
        assert secret.encode() not in rec.body


async def test_trace_416_resyncs_from_gitlabs_range(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
        trace.write(b"first line\n")
        await asyncio.sleep(0.2)
        assert bytes(gitlab.jobs[job.id].trace) == b"first line\n"
        gitlab.lose_trace(job.id, keep=6)  # GitLab lost "line\n"
        trace.write(b"second line\n")
        await asyncio.sleep(0.2)
        await trace.finish(JobOutcome.success())
    assert bytes(gitlab.jobs[job.id].trace) == b"first line\nsecond line\n"
    assert any(r.status == 416 for r in gitlab.requests)
    assert gitlab.jobs[job.id].status == "success"


async def test_5xx_on_trace_and_update_are_retried_until_accepted(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    gitlab.fail_next("trace", 500, 503)
    gitlab.fail_next("update", 502)
    gitlab.accepted_after = 2
    sleeps = Sleeps()
    trace = TraceStream.for_job(client, job, update_interval_s=0.01, sleep=sleeps)
    async with trace:
        trace.write(b"output\n")
        outcome = await trace.finish(JobOutcome.success())
    assert outcome.status == 200
    assert bytes(gitlab.jobs[job.id].trace) == b"output\n"
    assert gitlab.jobs[job.id].status == "success"
    statuses = [r.status for r in gitlab.requests if r.method in ("PATCH", "PUT")]
    assert statuses.count(500) + statuses.count(503) == 2
    assert 502 in statuses
    assert statuses.count(202) >= 3  # 1 trace patch + 2 "accepted, not yet completed"
    assert all(d > 0 for d in sleeps.delays)  # never retried without a pause


async def test_final_update_gives_up_after_its_time_budget(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    gitlab.fail_next("update", *([503] * 50))
    trace = TraceStream.for_job(client, job, update_interval_s=0.01, max_finish_s=0.5,
                                backoff=Backoff(base_s=0.05, max_s=0.1))
    started = time.monotonic()
    with pytest.raises(Exception, match="final update not accepted"):
        async with trace:
            await trace.finish(JobOutcome.success())
    assert time.monotonic() - started < 2
    assert 2 <= gitlab.count("PUT", f"/jobs/{job.id}") < 50
    # Leaving the block after a failed finish reports nothing else (the outcome is the
    # caller's to keep): every attempt said "success".
    states = [json.loads(r.body)["state"] for r in gitlab.requests
              if r.method == "PUT" and r.path.endswith(f"/jobs/{job.id}")]
    assert set(states) == {"success"}


async def test_update_interval_header_is_honoured(client: GitLabClient) -> None:
    fake = FakeGitLab(update_interval=2)
    await fake.start()
    try:
        async with GitLabClient(fake.url) as c:
            await fake.enqueue(make_job(51))
            job = await JobPoller(c, RUNNER, system_id="s").next_job()
            async with TraceStream.for_job(c, job, update_interval_s=0.05) as trace:
                trace.write(b"a\n")
                await asyncio.sleep(0.2)
                assert trace.interval == 2.0
                trace.write(b"b\n")
                await asyncio.sleep(0.4)
                assert fake.count("PATCH", "/trace") == 1  # b waits for the next 2 s tick
                await trace.finish(JobOutcome.success())
            assert bytes(fake.jobs[51].trace) == b"a\nb\n"
    finally:
        await fake.stop()


async def test_cancel_through_job_status_and_final_update_still_sent(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
        trace.write(b"working\n")
        await asyncio.sleep(0.15)
        gitlab.cancel(job.id)
        trace.write(b"still working\n")
        await asyncio.wait_for(trace.cancel_requested.wait(), 1.0)
        trace.write(b"ERROR: Job was canceled\n")
        await trace.finish(JobOutcome.failed("job_canceled"))
    fake_job = gitlab.jobs[job.id]
    assert fake_job.status == "canceled"
    assert fake_job.updates[-1]["failure_reason"] == "unknown_failure"  # job_canceled is internal
    assert bytes(fake_job.trace).endswith(b"ERROR: Job was canceled\n")


async def test_quiet_job_is_touched_and_hears_a_cancel(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    async with TraceStream.for_job(
        client, job, update_interval_s=0.05, force_send_interval_s=0.1
    ) as trace:
        gitlab.cancel(job.id)  # no output at all: only a keep-alive PUT can learn of it
        await asyncio.wait_for(trace.cancel_requested.wait(), 1.0)
        await trace.finish(JobOutcome.failed("job_canceled"))
    assert gitlab.jobs[job.id].updates[0]["state"] == "running"


async def test_leaving_without_finish_reports_a_system_failure(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)

    async def crash() -> None:
        async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
            trace.write(b"about to crash\n")
            raise RuntimeError("VM died")

    with pytest.raises(RuntimeError):
        await crash()
    fake_job = gitlab.jobs[job.id]
    assert fake_job.status == "failed"
    assert fake_job.updates[-1]["failure_reason"] == "runner_system_failure"
    assert b"about to crash\n" in fake_job.trace


# -- artifacts ------------------------------------------------------------------


def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return out.getvalue()


async def test_artifacts_upload_multipart_and_dependency_download(
    gitlab: FakeGitLab, client: GitLabClient, tmp_path: Path
) -> None:
    dep_payload = make_job(60)
    gitlab.add_finished_job(dep_payload, _zip({"dist/app.bin": b"\x00binary"}))
    artifacts = [{"name": "build", "untracked": False, "paths": ["out/"], "exclude": [],
                  "when": "on_success", "artifact_type": "archive", "artifact_format": "zip",
                  "expire_in": "2 days"}]
    dependencies = [{"id": 60, "name": "compile", "token": dep_payload["token"],
                     "artifacts_file": {"filename": "artifacts.zip", "size": 120}}]
    job = await _take(gitlab, client, job_id=61, artifacts=artifacts, dependencies=dependencies)
    gitlab.fail_next("upload", 502)
    sleeps = Sleeps()
    async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
        saved = await download_dependencies(client, job, trace, tmp_path)
        assert [(d.id, p.name) for d, p in saved] == [(60, "60.zip")]
        with zipfile.ZipFile(saved[0][1]) as z:
            assert z.read("dist/app.bin") == b"\x00binary"
        await upload_artifact(client, job, trace, job.artifacts[0],
                              _zip({"out/report.txt": b"ok"}), sleep=sleeps)
        await trace.finish(JobOutcome.success())
    (query, filename, data), = gitlab.jobs[61].artifacts
    assert query == {"artifact_type": "archive", "artifact_format": "zip",
                     "expire_in": "2 days"}
    assert filename == "build.zip"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == ["out/report.txt"]
    assert len(sleeps.delays) == 1  # one retry after the 502
    assert b"Uploading artifacts as \"archive\" to coordinator... 201 Created" in (
        gitlab.jobs[61].trace
    )
    download = next(r for r in gitlab.requests if r.method == "GET")
    assert download.headers["JOB-TOKEN"] == dep_payload["token"]


async def test_first_trace_bytes_go_out_at_once(gitlab: FakeGitLab, client: GitLabClient) -> None:
    job = await _take(gitlab, client)
    async with TraceStream.for_job(client, job, update_interval_s=3.0) as trace:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        trace.write(b"Running with snapfleet\n")
        while not gitlab.jobs[job.id].trace:
            await asyncio.sleep(0.01)
            assert time.monotonic() - started < 1.0
        await trace.finish(JobOutcome.success())
    assert bytes(gitlab.jobs[job.id].trace) == b"Running with snapfleet\n"


async def test_an_unreadable_job_without_an_id_is_backed_off(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    gitlab.fail_next("request", 201, 201, 201)  # 201 with a body that is no job at all
    await gitlab.enqueue(make_job(33))
    sleeps = Sleeps()
    poller = JobPoller(client, RUNNER, system_id="s_test", check_interval_s=0.0, sleep=sleeps,
                       rng=random.Random(2))
    job = await asyncio.wait_for(poller.next_job(), 10)
    assert job.id == 33
    assert gitlab.count("POST", "/jobs/request") == 4
    assert len(sleeps.delays) == 3
    assert all(d > 0 for d in sleeps.delays)
    assert sleeps.delays[2] > sleeps.delays[0]


async def test_a_refused_trace_patch_is_resent_and_does_not_stop_the_job(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    trace = TraceStream.for_job(client, job, update_interval_s=0.05,
                                backoff=Backoff(base_s=0.05, max_s=0.1))
    async with trace:
        trace.write(b"first line\n")
        await asyncio.sleep(0.3)
        gitlab.fail_next("trace", 416, 400)  # a 416 without Range, then a plain refusal
        trace.write(b"second line\n")
        await asyncio.sleep(0.6)
        assert not trace.aborted.is_set()  # the job is not stopped as "canceled in GitLab"
        assert not trace.cancel_requested.is_set()
        trace.write(b"third line\n")
        outcome = await trace.finish(JobOutcome.success())
    assert outcome.status == 200
    assert bytes(gitlab.jobs[job.id].trace) == b"first line\nsecond line\nthird line\n"
    assert gitlab.jobs[job.id].status == "success"
    statuses = [r.status for r in gitlab.requests if r.method == "PATCH"]
    assert 400 in statuses
    assert 416 in statuses


async def test_a_refused_trace_patch_at_finish_is_retried(
    gitlab: FakeGitLab, client: GitLabClient
) -> None:
    job = await _take(gitlab, client)
    trace = TraceStream.for_job(client, job, update_interval_s=0.05,
                                backoff=Backoff(base_s=0.05, max_s=0.1))
    trace.write(b"only line\n")  # no sender running: finish sends it all
    gitlab.fail_next("trace", 400, 416)
    outcome = await trace.finish(JobOutcome.success())
    assert outcome.status == 200
    assert bytes(gitlab.jobs[job.id].trace) == b"only line\n"
