"""The GitHub REST client against a spec-checked fake GitHub (a real local aiohttp server)."""

from __future__ import annotations

import pickle
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.errors import ConfigError, ForgeAuthError, ForgeError, ForgeUnavailable
from runner.forge.github._http import RetryPolicy, Transport
from runner.forge.github.api import GitHubClient
from runner.forge.github.auth import REFRESH_MARGIN_S, AppCredentials, TokenCredentials
from runner.forge.github.config import GitHubConfig
from runner.forge.github.types import JitConfig, Scope
from runner.secret import Secret
from tests.fake_github import FakeGitHub

TOKEN = "ghp_statictoken0123456789"
REPO = "octo-org/hello"
ORG = "octo-org"


class FakeTime:
    """A clock that moves only when the code under test sleeps; records each sleep."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def fake(fake_time: FakeTime) -> AsyncIterator[FakeGitHub]:
    # The /api/v3 prefix is how Enterprise Server serves the API; it checks base-path joins.
    server = FakeGitHub(prefix="/api/v3", clock=fake_time.clock)
    server.add_token(TOKEN)
    await server.start()
    yield server
    await server.close()
    assert server.violations == [], "requests or responses did not match GitHub's spec"


def transport(url: str, fake_time: FakeTime, **retry: float) -> Transport:
    return Transport(
        url,
        retry=RetryPolicy(**retry),  # type: ignore[arg-type]
        sleep=fake_time.sleep,
        clock=fake_time.clock,
        rng=random.Random(7),
        timeout_s=5,
    )


@pytest.fixture
async def client(fake: FakeGitHub, fake_time: FakeTime) -> AsyncIterator[GitHubClient]:
    async with GitHubClient(TokenCredentials(Secret(TOKEN)), transport(fake.url, fake_time)) as c:
        yield c


def rsa_pem() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def error_text(exc: BaseException) -> str:
    """Everything an exception chain would show in a log or traceback."""
    parts = []
    current: BaseException | None = exc
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


# -- JIT runners ------------------------------------------------------------------


@pytest.mark.parametrize("scope", [REPO, ORG])
async def test_generate_jitconfig(fake: FakeGitHub, client: GitHubClient, scope: str) -> None:
    jit = await client.generate_jitconfig(
        scope, name="snapfleet-h1-cpu-1", labels=["self-hosted", "snapfleet"], runner_group_id=3
    )
    registered = fake.runners[scope][jit.runner_id]
    assert registered["name"] == jit.name == "snapfleet-h1-cpu-1"
    assert [label["name"] for label in registered["labels"]] == ["self-hosted", "snapfleet"]
    assert registered["runner_group_id"] == 3
    assert jit.encoded_jit_config.reveal() == fake.jit_configs[jit.runner_id]
    kind = "repos" if "/" in scope else "orgs"
    assert ("POST", f"/api/v3/{kind}/{scope}/actions/runners/generate-jitconfig") in fake.requests


async def test_jit_config_value_never_shows(client: GitHubClient, fake: FakeGitHub) -> None:
    jit = await client.generate_jitconfig(REPO, name="r1", labels=["x"], runner_group_id=1)
    value = jit.encoded_jit_config.reveal()
    shown = [repr(jit), str(jit), f"{jit}", f"{jit.encoded_jit_config}", str(vars(jit))]
    assert all(value not in text for text in shown)
    with pytest.raises(TypeError):
        pickle.dumps(jit)
    assert jit == JitConfig(jit.runner_id, "r1", Secret(value))


async def test_duplicate_runner_name_is_a_conflict(client: GitHubClient) -> None:
    await client.generate_jitconfig(REPO, name="dup", labels=["x"], runner_group_id=1)
    with pytest.raises(ForgeError) as info:
        await client.generate_jitconfig(REPO, name="dup", labels=["x"], runner_group_id=1)
    assert info.value.status == 409
    assert not isinstance(info.value, ForgeUnavailable | ForgeAuthError)


# -- listing and deleting runners -----------------------------------------------------


async def test_list_runners_follows_pages(client: GitHubClient, fake: FakeGitHub) -> None:
    ids = [fake.add_runner(ORG, f"snapfleet-h1-{i}", busy=i % 2 == 0) for i in range(250)]
    runners = await client.list_runners(ORG)
    assert [r.id for r in runners] == ids
    assert [r.busy for r in runners[:2]] == [True, False]
    assert runners[0].labels == ("self-hosted",)
    assert fake.requests.count(("GET", f"/api/v3/orgs/{ORG}/actions/runners")) == 3


async def test_list_runners_by_name(client: GitHubClient, fake: FakeGitHub) -> None:
    fake.add_runner(REPO, "a")
    wanted = fake.add_runner(REPO, "b", status="offline")
    [runner] = await client.list_runners(REPO, name="b")
    assert (runner.id, runner.status) == (wanted, "offline")


async def test_delete_runner(client: GitHubClient, fake: FakeGitHub) -> None:
    runner_id = fake.add_runner(REPO, "a")
    await client.delete_runner(REPO, runner_id)
    assert runner_id not in fake.runners[REPO]
    await client.delete_runner(REPO, runner_id)  # 404: already gone is fine
    # The spec documents only 204 and 422 for this operation; GitHub does answer 404.
    assert fake.undocumented == ["DELETE /repos/{owner}/{repo}/actions/runners/{runner_id} -> 404"]
    busy = fake.add_runner(REPO, "b", busy=True)
    with pytest.raises(ForgeError) as info:
        await client.delete_runner(Scope.parse(REPO), busy)
    assert info.value.status == 422


# -- queued jobs ----------------------------------------------------------------------


async def test_queued_jobs(client: GitHubClient, fake: FakeGitHub) -> None:
    run, first = fake.add_job(REPO, ["self-hosted", "gpu"])
    _, second = fake.add_job(REPO, ["self-hosted"], run_id=run)
    fake.add_job(REPO, ["x"], run_id=run, job_status="in_progress")
    # A run is in_progress once one job started; its other jobs may still be queued.
    started, matrix = fake.add_job(REPO, ["m"], run_status="in_progress")
    fake.add_job(REPO, ["m"], run_id=started, job_status="completed")
    fake.add_job(REPO, ["done"], run_status="completed", job_status="completed")
    jobs = await client.queued_jobs(REPO)
    assert {(j.id, j.run_id, j.labels, j.repo) for j in jobs} == {
        (first, run, ("self-hosted", "gpu"), REPO),
        (second, run, ("self-hosted",), REPO),
        (matrix, started, ("m",), REPO),
    }


async def test_queued_jobs_pages_runs_and_jobs(client: GitHubClient, fake: FakeGitHub) -> None:
    run, _ = fake.add_job(REPO, ["a"])
    for _ in range(120):
        fake.add_job(REPO, ["a"], run_id=run)
    for _ in range(100):
        fake.add_job(REPO, ["b"])
    jobs = await client.queued_jobs(REPO, run_statuses=("queued",))
    assert len(jobs) == 221
    assert fake.requests.count(("GET", f"/api/v3/repos/{REPO}/actions/runs")) == 2


async def test_queued_jobs_needs_a_repository(client: GitHubClient) -> None:
    with pytest.raises(ForgeError, match="owner/repo"):
        await client.queued_jobs(ORG)


# -- rate limits and retries ----------------------------------------------------------

RUNNERS = r"/repos/octo-org/hello/actions/runners"


async def test_primary_rate_limit_waits_for_reset(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    reset = int(fake_time.now) + 30
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    fake.inject("GET", RUNNERS, 403, headers=headers, body={"message": "API rate limit exceeded"})
    assert await client.list_runners(REPO) == []
    assert fake_time.sleeps == [31.0]


@pytest.mark.parametrize("status", [403, 429])
async def test_secondary_rate_limit_honours_retry_after(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime, status: int
) -> None:
    fake.inject("GET", RUNNERS, status, headers={"retry-after": "7"})
    assert await client.list_runners(REPO) == []
    assert fake_time.sleeps == [7.0]


async def test_secondary_limit_without_retry_after_waits_a_minute(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    body = {"message": "You have exceeded a secondary rate limit."}
    fake.inject("GET", RUNNERS, 403, body=body)
    assert await client.list_runners(REPO) == []
    assert fake_time.sleeps == [60.0]


async def test_exhausted_quota_is_waited_out_before_the_next_request(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(fake_time.now) + 10)}
    fake.inject("GET", RUNNERS, 200, headers=headers, body={"total_count": 0, "runners": []})
    await client.list_runners(REPO)
    assert fake_time.sleeps == []
    await client.list_runners(REPO)
    assert fake_time.sleeps == [11.0]


async def test_rate_limit_longer_than_the_budget_gives_up(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    fake.inject("GET", RUNNERS, 429, headers={"retry-after": "3600"})
    with pytest.raises(ForgeUnavailable) as info:
        await client.list_runners(REPO)
    assert info.value.retry_after == 3600.0
    assert info.value.status == 429
    assert fake_time.sleeps == []


async def test_5xx_is_retried_with_backoff(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    fake.inject("GET", RUNNERS, 502, times=2)
    fake.inject("GET", RUNNERS, 503)
    assert await client.list_runners(REPO) == []
    first, second, third = fake_time.sleeps
    assert 0.5 <= first <= 1.0
    assert 1.0 <= second <= 2.0
    assert 2.0 <= third <= 4.0


async def test_persistent_5xx_is_unavailable(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    fake.inject("POST", RUNNERS + "/generate-jitconfig", 500, times=10)
    with pytest.raises(ForgeUnavailable) as info:
        await client.generate_jitconfig(REPO, name="r", labels=["x"], runner_group_id=1)
    assert info.value.status == 500
    assert len(fake_time.sleeps) == 4  # five attempts
    assert fake.requests.count(("POST", "/api/v3" + RUNNERS + "/generate-jitconfig")) == 5


async def test_connection_errors_are_unavailable(fake_time: FakeTime) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: every attempt is refused.
    down = transport(f"http://127.0.0.1:{port}", fake_time, max_attempts=3)
    async with GitHubClient(TokenCredentials(Secret(TOKEN)), down) as gh:
        with pytest.raises(ForgeUnavailable) as info:
            await gh.list_runners(REPO)
    assert len(fake_time.sleeps) == 2
    assert TOKEN not in error_text(info.value)


async def test_total_wait_is_bounded(fake: FakeGitHub, fake_time: FakeTime) -> None:
    fake.inject("GET", RUNNERS, 502, times=10)
    tight = transport(fake.url, fake_time, max_attempts=10, max_wait_s=5.0)
    async with GitHubClient(TokenCredentials(Secret(TOKEN)), tight) as gh:
        with pytest.raises(ForgeUnavailable):
            await gh.list_runners(REPO)
    assert sum(fake_time.sleeps) <= 5.0


async def test_bad_token_is_an_auth_error(fake: FakeGitHub, fake_time: FakeTime) -> None:
    bad = "ghp_wrongtoken"
    async with GitHubClient(TokenCredentials(Secret(bad)), transport(fake.url, fake_time)) as gh:
        with pytest.raises(ForgeAuthError) as info:
            await gh.list_runners(REPO)
    assert info.value.status == 401
    assert "Bad credentials" in str(info.value)
    assert bad not in error_text(info.value)
    assert fake_time.sleeps == []


async def test_forbidden_is_an_auth_error_without_retry(
    client: GitHubClient, fake: FakeGitHub, fake_time: FakeTime
) -> None:
    fake.inject("GET", RUNNERS, 403, body={"message": "Resource not accessible by integration"})
    with pytest.raises(ForgeAuthError, match="not accessible"):
        await client.list_runners(REPO)
    assert fake_time.sleeps == []


async def test_links_off_the_api_are_not_followed(fake_time: FakeTime) -> None:
    api = transport("https://api.github.com", fake_time)
    with pytest.raises(ForgeError, match="off the API"):
        await api.request("GET", "https://evil.example/steal", authorization=Secret("Bearer x"))
    await api.close()


# -- GitHub App authentication --------------------------------------------------------


@pytest.fixture
async def app_client(
    fake: FakeGitHub, fake_time: FakeTime
) -> AsyncIterator[tuple[GitHubClient, AppCredentials]]:
    private, public = rsa_pem()
    fake.add_installation(42, app_id=1234, public_key_pem=public)
    creds = AppCredentials(1234, 42, private, clock=fake_time.clock)
    async with GitHubClient(creds, transport(fake.url, fake_time)) as gh:
        yield gh, creds


async def test_app_token_is_fetched_once_and_cached(
    app_client: tuple[GitHubClient, AppCredentials], fake: FakeGitHub
) -> None:
    gh, creds = app_client
    fake.add_runner(REPO, "a")
    await gh.list_runners(REPO)
    await gh.list_runners(REPO)
    await gh.generate_jitconfig(REPO, name="r", labels=["x"], runner_group_id=1)
    assert creds.fetches == 1
    assert fake.requests.count(("POST", "/api/v3/app/installations/42/access_tokens")) == 1


async def test_app_token_is_refreshed_before_expiry(
    app_client: tuple[GitHubClient, AppCredentials], fake: FakeGitHub, fake_time: FakeTime
) -> None:
    gh, creds = app_client
    await gh.list_runners(REPO)
    fake_time.now += fake.token_ttl_s - REFRESH_MARGIN_S - 1
    await gh.list_runners(REPO)
    assert creds.fetches == 1
    fake_time.now += 2  # now inside the margin: refresh although the token still works
    await gh.list_runners(REPO)
    assert creds.fetches == 2


async def test_revoked_app_token_is_replaced_once(
    app_client: tuple[GitHubClient, AppCredentials], fake: FakeGitHub
) -> None:
    gh, creds = app_client
    await gh.list_runners(REPO)
    fake.tokens = {t: e for t, e in fake.tokens.items() if t == TOKEN}  # revoke
    await gh.list_runners(REPO)
    assert creds.fetches == 2


async def test_wrong_app_key_is_an_auth_error(fake: FakeGitHub, fake_time: FakeTime) -> None:
    private, _ = rsa_pem()
    _, other_public = rsa_pem()
    fake.add_installation(42, app_id=1234, public_key_pem=other_public)
    creds = AppCredentials(1234, 42, private, clock=fake_time.clock)
    async with GitHubClient(creds, transport(fake.url, fake_time)) as gh:
        with pytest.raises(ForgeAuthError) as info:
            await gh.list_runners(REPO)
    assert "installation 42" in str(info.value)
    assert private.decode() not in error_text(info.value)


async def test_unknown_installation_is_an_auth_error(fake: FakeGitHub, fake_time: FakeTime) -> None:
    private, public = rsa_pem()
    fake.add_installation(42, app_id=1234, public_key_pem=public)
    creds = AppCredentials(1234, 99, private, clock=fake_time.clock)
    async with GitHubClient(creds, transport(fake.url, fake_time)) as gh:
        with pytest.raises(ForgeAuthError):
            await gh.list_runners(REPO)


def test_private_key_errors_do_not_quote_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        AppCredentials(1, 2, b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    assert "c2VjcmV0" not in error_text(info.value)


# -- configuration --------------------------------------------------------------------


async def test_from_config_with_app(fake: FakeGitHub, fake_time: FakeTime, tmp_path: Path) -> None:
    private, public = rsa_pem()
    key = tmp_path / "app.pem"
    key.write_bytes(private)
    fake.add_installation(7, app_id=55, public_key_pem=public)
    config = GitHubConfig(
        api_url=fake.url, scopes=[REPO], app_id=55, installation_id=7, private_key_path=key
    )
    gh = GitHubClient.from_config(config, clock=fake_time.clock, sleep=fake_time.sleep)
    async with gh:
        assert await gh.list_runners(REPO) == []
    assert config.repos_to_poll() == [Scope("octo-org", "hello")]


@pytest.mark.parametrize(
    "fields",
    [
        {"scopes": [REPO]},
        {
            "scopes": [REPO],
            "token": "t",
            "app_id": 1,
            "installation_id": 2,
            "private_key_path": "/k",
        },
        {"scopes": [REPO], "app_id": 1},
        {"scopes": ["a/b/c"], "token": "t"},
        {"scopes": [ORG], "poll_repos": [ORG], "token": "t"},
        {"scopes": [], "token": "t"},
    ],
)
def test_config_validation(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError is a ValueError
        GitHubConfig.model_validate(fields)


def test_config_hides_secrets() -> None:
    config = GitHubConfig(scopes=[REPO], token="ghp_hidden", webhook_secret="hook-secret")  # type: ignore[arg-type]
    assert "ghp_hidden" not in repr(config)
    assert "hook-secret" not in repr(config)
