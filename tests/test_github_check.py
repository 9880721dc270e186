"""`snapfleet github check` as a user runs it (a subprocess), against the fake GitHub.

PyGithub's requests are checked like ours: against GitHub's published schema, and
for webhooks against the shapes of GitHub's REST docs (see ``fake_github``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fake_github import FakeGitHub
from tests.fake_scaleset import FakeScaleSetService
from tests.test_github_api import rsa_pem

TOKEN = "ghs_check_token"
REPO = "octo-org/hello"
ORG = "octo-org"
HOOK_URL = "https://ci.example.test/webhooks/github"
LABELS = ["self-hosted", "linux"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    server = FakeGitHub(prefix="/api/v3")
    server.pygithub = True
    await server.start()
    server.add_token(TOKEN)
    yield server
    await server.close()
    assert server.violations == [], "PyGithub's requests or our answers left the schema"


async def check(tmp_path: Path, github: str, *, profiles: str = "") -> tuple[int, str]:
    config = tmp_path / "config.toml"
    config.write_text(f"[github]\n{github}\n[profiles.default]\n{profiles}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner.cli", "--config", str(config), "github", "check",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def token_config(fake: FakeGitHub, scope: str, extra: str = "", token: str = TOKEN) -> str:
    return (f'api_url = "{fake.url}"\nscopes = ["{scope}"]\ntoken = "{token}"\n'
            f'webhook_secret = "s3cret"\nwebhook_url = "{HOOK_URL}"\n{extra}')


async def test_a_correct_repository_setup_passes(tmp_path: Path, fake: FakeGitHub) -> None:
    fake.add_hook(REPO, "https://elsewhere.test/hook", events=("push",))
    fake.add_hook(REPO, HOOK_URL)
    code, out = await check(tmp_path, token_config(fake, REPO))
    assert code == 0, out
    assert "PROBLEM" not in out
    assert f"{REPO}: may register self-hosted runners" in out
    assert "active, signed, delivers workflow_job" in out
    assert out.rstrip().endswith("all checks passed")
    # The permission was proven by doing what the daemon does, not inferred.
    assert ("POST", f"/api/v3/repos/{REPO}/actions/runners/registration-token") in fake.requests
    assert ("GET", f"/api/v3/repos/{REPO}/hooks") in fake.requests
    assert TOKEN not in out


async def test_each_webhook_and_runner_group_problem_comes_with_its_fix(
    tmp_path: Path, fake: FakeGitHub
) -> None:
    fake.add_hook(ORG, HOOK_URL, events=("push", "workflow_run"), secret=False,
                  content_type="form")
    code, out = await check(tmp_path, token_config(fake, ORG, "runner_group_id = 7"))
    assert code == 1, out
    lines = out.splitlines()

    def fix_of(fragment: str) -> str:
        at = next(i for i, line in enumerate(lines) if fragment in line)
        assert lines[at].startswith("PROBLEM"), lines[at]
        return lines[at + 1].strip()

    assert "runner group" in fix_of("runner group 7 of octo-org: GitHub answered 404")
    assert "webhook_secret" in fix_of("has no secret")
    assert "'Workflow jobs'" in fix_of("does not deliver workflow_job")
    assert "application/json" in fix_of("sends form payloads")
    assert f"{ORG}: may register self-hosted runners" in out  # what works is said too
    assert out.rstrip().endswith("4 problems found")


async def test_a_missing_webhook_and_a_refused_registration(
    tmp_path: Path, fake: FakeGitHub
) -> None:
    fake.inject("POST", f"/orgs/{ORG}/actions/runners/registration-token", 403)
    code, out = await check(tmp_path, token_config(fake, ORG))
    assert code == 1
    assert "registering runners at octo-org: GitHub answered 403" in out
    assert "'Self-hosted runners: read and write' on organization octo-org" in out
    # Its scope's later checks are skipped; the run goes on to the end.
    assert out.rstrip().endswith("1 problem found")
    fake.inject("POST", f"/repos/{REPO}/actions/runners/registration-token", 403)
    code, out = await check(tmp_path, token_config(fake, REPO))
    assert "'Administration: read and write' on octo-org/hello" in out
    code, out = await check(tmp_path, token_config(fake, REPO).replace(
        f'webhook_url = "{HOOK_URL}"\n', ""))
    assert code == 1
    assert "no webhook delivers to …/webhooks/github (webhooks: none)" in out
    assert "set github.webhook_url" in out


async def test_a_bad_token_is_named_and_never_printed(tmp_path: Path, fake: FakeGitHub) -> None:
    code, out = await check(tmp_path, token_config(fake, REPO, token="ghp_not_a_real_one"))
    assert code == 1
    assert "the token: GitHub answered 401" in out
    assert "make a new one" in out
    assert "ghp_not_a_real_one" not in out
    gone = token_config(fake, REPO).replace(fake.url, "http://127.0.0.1:9/api/v3")
    code, out = await check(tmp_path, gone)
    assert code == 1
    assert "PROBLEM the token: ConnectionError" in out
    assert "check github.api_url" in out


async def test_an_app_needs_its_installation_and_runner_permissions(
    tmp_path: Path, fake: FakeGitHub
) -> None:
    private, public = rsa_pem()
    key = tmp_path / "app.pem"
    key.write_bytes(private)
    fake.add_installation(42, app_id=1234, public_key_pem=public, permissions={
        "organization_self_hosted_runners": "read", "organization_hooks": "read"})
    fake.add_hook(ORG, HOOK_URL)
    app = (f'api_url = "{fake.url}"\nscopes = ["{ORG}"]\napp_id = 1234\n'
           f'private_key_path = "{key}"\nwebhook_secret = "s"\nwebhook_url = "{HOOK_URL}"\n')
    code, out = await check(tmp_path, app + "installation_id = 42")
    assert code == 1, out
    assert "GitHub App 1234 installation 42 reachable" in out
    assert "installation 42 has organization_self_hosted_runners: read" in out
    assert "accept the new permissions on the installation" in out
    assert "active, signed, delivers workflow_job" in out  # checked with the App's token
    assert any(path.endswith("/app/installations/42/access_tokens")
               for _, path in fake.requests)
    code, out = await check(tmp_path, app + "installation_id = 43")
    assert code == 1
    assert "the App has no installation 43" in out


async def test_scale_set_mode_checks_the_group_and_the_scale_sets(
    tmp_path: Path, fake: FakeGitHub
) -> None:
    service = FakeScaleSetService(fake)
    service.groups[7] = "ci-runners"
    fake.add_runner_group(ORG, "ci-runners")
    github = (f'mode = "scaleset"\napi_url = "{fake.url}"\nscopes = ["{ORG}"]\n'
              f'token = "{TOKEN}"\nhost = "h1"\n')
    profiles = f"labels = {json.dumps(LABELS)}\n"
    code, out = await check(tmp_path, github + 'runner_group = "ci-runners"', profiles=profiles)
    assert code == 0, out
    assert "runner group 'ci-runners' exists" in out
    assert "runner group 'ci-runners' is id 7" in out
    assert "scale set snapfleet-h1-default (profile default) does not exist yet" in out
    assert "webhook" not in out.lower()  # no inbound port in this mode: nothing to check
    code, out = await check(tmp_path, github + 'runner_group = "gpu-boxes"', profiles=profiles)
    assert code == 1
    assert "no runner group named 'gpu-boxes' (there are: Default, ci-runners)" in out
    assert 'github.runner_group = "default"' in out
    assert service.violations == []
