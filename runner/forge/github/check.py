"""`snapfleet github check`: is GitHub set up the way the configuration says?

Blocking PyGithub calls (the command runs them in a thread), pointed at the
configured API URL: the token or App (installation reachable, permission to
register self-hosted runners at each scope), the runner group, and the
webhook (webhook mode) or the scale sets (scale-set mode, through our own
client: PyGithub does not speak the Actions service). Each finding says
what is wrong and how to fix it; PyGithub's exceptions stop here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from github import Auth, Github, GithubException, GithubIntegration

from runner import __version__
from runner.errors import ForgeAuthError, SnapfleetError
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.scaleset_client import ActionsService, ScaleSetClient
from runner.forge.github.types import Scope

T = TypeVar("T")
API_VERSION = "2022-11-28"
WEBHOOK_EVENT = "workflow_job"


@dataclass(frozen=True)
class Finding:
    """One thing checked: fine, or a problem with its fix."""

    ok: bool
    what: str
    fix: str | None = None


def problem(what: str, fix: str) -> Finding:
    return Finding(False, what, fix)


def fine(what: str) -> Finding:
    return Finding(True, what)


class _Failed(Exception):
    """A call failed; ``finding`` says why and what to do."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.what)
        self.finding = finding


def _call(what: str, call: Callable[[], T], fixes: Mapping[int, str]) -> T:
    """Run a PyGithub call; a failure becomes a finding with the fix for its status."""
    try:
        return call()
    except GithubException as exc:
        message = exc.message or (exc.data.get("message") if isinstance(exc.data, dict)
                                  else None) or ""
        fix = fixes.get(exc.status) or fixes.get(0) or "see GitHub's answer above"
        raise _Failed(problem(f"{what}: GitHub answered {exc.status} {message}".rstrip(),
                              fix)) from None
    except OSError as exc:  # requests' errors (connection, timeout) are OSErrors
        raise _Failed(problem(f"{what}: {type(exc).__name__}",
                              "check github.api_url and this host's route to it")) from None


def _connect_options(config: GitHubConfig) -> dict[str, Any]:
    return {"base_url": config.api_url.rstrip("/"), "user_agent": f"snapfleet/{__version__}",
            "timeout": int(config.request_timeout_s), "retry": None, "api_version": API_VERSION,
            "seconds_between_requests": None, "seconds_between_writes": None,
            "lazy": True}  # no GET of an organization or repository before each call


def _permission_fix(config: GitHubConfig, scope: Scope) -> str:
    if config.app_id is not None:
        wanted = ("'Self-hosted runners: read and write' (organization)" if scope.kind == "org"
                  else "'Administration: read and write' (repository)")
        return (f"give the GitHub App {wanted}, then accept the new permissions on the "
                f"installation for {scope.owner}")
    if scope.kind == "org":
        return (f"a fine-grained token needs 'Self-hosted runners: read and write' on "
                f"organization {scope.owner} (a classic one: admin:org)")
    return (f"a fine-grained token needs 'Administration: read and write' on {scope} "
            f"(a classic one: repo)")


class Checker:
    """Runs the checks for one configuration; `run` yields findings as it goes."""

    def __init__(self, config: GitHubConfig, *, labels: Mapping[str, Sequence[str]],
                 host: str, webhook_url: str | None = None) -> None:
        self.config = config
        self.labels = labels
        self.host = host
        self.webhook_url = webhook_url or config.webhook_url
        self.scopes = [Scope.parse(s) for s in config.scopes]
        self._permitted = False

    def run(self) -> Iterator[Finding]:
        """Every finding, in order; a scope that cannot be reached skips its later checks."""
        try:
            gh = yield from self._credentials()
        except _Failed as failed:
            yield failed.finding
            return
        with gh:
            for scope in self.scopes:
                steps: list[Callable[[], Iterator[Finding]]] = [
                    lambda: iter([self._runner_permission(gh, scope)]),  # noqa: B023
                    lambda: iter([self._runner_group(gh, scope)]),  # noqa: B023
                ]
                if self.config.mode == "webhook":
                    steps.append(lambda: self._webhooks(gh, scope))  # noqa: B023
                for step in steps:
                    try:
                        yield from step()
                    except _Failed as failed:
                        yield failed.finding
                    except GithubException as exc:  # a call we did not expect to fail
                        yield problem(f"{scope}: GitHub answered {exc.status} "
                                      f"{exc.message or ''}".rstrip(),
                                      "check it by hand in the scope's settings")
                    if step is steps[0] and not self._permitted:
                        break  # the scope is out of reach: its other checks would say so too
            if self.config.mode == "webhook" and self.config.webhook_secret is None:
                yield problem("no github.webhook_secret: the daemon serves no webhook and "
                              "hears of jobs only by polling (every reconcile_interval_s)",
                              "set webhook_secret (the secret of the repository or "
                              "organization webhook), or use mode = \"scaleset\"")

    # -- credentials ---------------------------------------------------------------------

    def _credentials(self) -> Generator[Finding, None, Github]:
        """Yields findings; returns a ``Github`` for the token or the App's installation."""
        options = _connect_options(self.config)
        if self.config.token is not None:
            gh = Github(auth=Auth.Token(self.config.token.get_secret_value()), **options)
            _call("the token", gh.get_rate_limit, {
                401: "the token is wrong, expired or revoked: make a new one "
                     "(github.token or the github__token credential)"})
            yield fine(f"token accepted by {self.config.api_url}")
            return gh
        return (yield from self._app(options))

    def _app(self, options: dict[str, Any]) -> Generator[Finding, None, Github]:
        assert self.config.app_id is not None
        assert self.config.installation_id is not None
        assert self.config.private_key_path is not None
        try:
            key = self.config.private_key_path.read_text()
        except OSError as exc:
            raise _Failed(problem(f"cannot read github.private_key_path: {exc.strerror}",
                                  "point private_key_path at the App's .pem file")) from None
        app = GithubIntegration(auth=Auth.AppAuth(self.config.app_id, key), **options)
        iid = self.config.installation_id
        installation = _call(f"GitHub App {self.config.app_id}, installation {iid}",
                             lambda: app.get_app_installation(iid), {
            401: "app_id or the private key is wrong (or the key was revoked): generate a "
                 "new private key in the App's settings",
            404: f"the App has no installation {iid}: install it on the organization or "
                 "repositories and take installation_id from its URL"})
        yield fine(f"GitHub App {self.config.app_id} installation {iid} reachable")
        account = (installation.raw_data.get("account") or {}).get("login")
        owners = sorted({s.owner for s in self.scopes})
        elsewhere = [o for o in owners if account and o.lower() != str(account).lower()]
        if elsewhere:
            yield problem(f"installation {iid} is on {account}, not on {', '.join(elsewhere)}",
                          "install the App there too (one installation per account) or "
                          "change github.scopes")
        granted = installation.raw_data.get("permissions") or {}
        for scope in self.scopes:
            name = ("organization_self_hosted_runners" if scope.kind == "org"
                    else "administration")
            if granted.get(name) != "write":
                yield problem(f"installation {iid} has {name}: {granted.get(name, 'none')} "
                              f"(runners at {scope} need write)",
                              _permission_fix(self.config, scope))
        gh = app.get_github_for_installation(iid)
        _call("an installation token", gh.get_rate_limit, {
            0: "the App's installation token was refused: check the App is not suspended"})
        return gh

    # -- per scope ---------------------------------------------------------------------

    def _runner_permission(self, gh: Github, scope: Scope) -> Finding:
        self._permitted = False
        fixes = {403: _permission_fix(self.config, scope),
                 404: f"{scope} does not exist or this identity cannot see it: check "
                      "github.scopes (and that the App is installed there)"}
        if scope.kind == "org":
            org = gh.get_organization(scope.owner)
            runners = _call(f"listing runners of {scope}",
                            lambda: org.get_self_hosted_runners().totalCount, fixes)
            _call(f"registering runners at {scope}",
                  org.create_self_hosted_runner_registration_token, fixes)
        else:
            repo = gh.get_repo(str(scope), lazy=True)
            runners = _call(f"listing runners of {scope}",
                            lambda: repo.get_self_hosted_runners().totalCount, fixes)
            _call(f"registering runners at {scope}", lambda: gh.requester.requestJsonAndCheck(
                "POST", f"{scope.path}/actions/runners/registration-token"), fixes)
        self._permitted = True
        return fine(f"{scope}: may register self-hosted runners ({runners} registered now)")

    def _runner_group(self, gh: Github, scope: Scope) -> Finding:
        scaleset = self.config.mode == "scaleset"
        if scope.kind == "repo":
            if (self.config.runner_group if scaleset else self.config.runner_group_id) in (
                "default", 1
            ):
                return fine(f"{scope}: runners join the repository (no runner groups there)")
            key = "runner_group" if scaleset else "runner_group_id"
            return problem(f"{scope}: github.{key} is set, but a repository's runners have "
                           "no groups", f"remove {key}, or register at the organization")
        fixes = {403: _permission_fix(self.config, scope)}
        if scaleset:
            wanted = self.config.runner_group
            groups = _call(f"listing runner groups of {scope}", lambda: [
                g for g in _paged(gh, f"{scope.path}/actions/runner-groups", "runner_groups")],
                fixes)
            names = {str(g.get("name", "")).lower(): g for g in groups}
            if wanted.lower() in names:
                return fine(f"{scope}: runner group {wanted!r} exists")
            return problem(f"{scope}: no runner group named {wanted!r} (there are: "
                           f"{', '.join(sorted(str(g.get('name')) for g in groups))})",
                           "create it (Settings → Actions → Runner groups) or set "
                           "github.runner_group = \"default\"")
        gid = self.config.runner_group_id
        fixes[404] = (f"runner group {gid} does not exist in {scope}: take the id from the "
                      "group's URL (Settings → Actions → Runner groups) or use 1 (Default)")
        _, group = _call(f"runner group {gid} of {scope}", lambda: gh.requester.
                         requestJsonAndCheck("GET", f"{scope.path}/actions/runner-groups/{gid}"),
                         fixes)
        return fine(f"{scope}: runner group {gid} ({group.get('name')}) exists")

    def _webhooks(self, gh: Github, scope: Scope) -> Iterator[Finding]:
        target = gh.get_organization(scope.owner) if scope.kind == "org" else gh.get_repo(
            str(scope), lazy=True)
        where = "Settings → Webhooks"
        fixes = {403: "this identity cannot read webhooks (a token needs 'Webhooks: read'; "
                      f"classic: admin:{'org' if scope.kind == 'org' else 'repo'}_hook): "
                      f"check {where} of {scope} by hand",
                 404: "this identity cannot read webhooks: check by hand"}
        hooks = _call(f"listing webhooks of {scope}", lambda: list(target.get_hooks()), fixes)
        url = self.webhook_url
        ours = [h for h in hooks if (h.config or {}).get("url") == url] if url else [
            h for h in hooks if str((h.config or {}).get("url", "")).endswith("/webhooks/github")]
        if not ours:
            seen = ", ".join(str((h.config or {}).get("url")) for h in hooks) or "none"
            wanted = url or "…/webhooks/github"
            yield problem(f"{scope}: no webhook delivers to {wanted} (webhooks: {seen})",
                          f"add one in {where}: payload URL {wanted}, content type "
                          "application/json, the secret of github.webhook_secret, event "
                          "'Workflow jobs'" + ("" if url else "; set github.webhook_url to "
                                               "check the exact URL"))
            return
        for hook in ours:
            yield from self._hook(scope, hook)

    def _hook(self, scope: Scope, hook: Any) -> Iterator[Finding]:
        config = hook.config or {}
        name = f"{scope}: webhook {hook.id} → {config.get('url')}"
        bad = False
        if not hook.active:
            bad = True
            yield problem(f"{name} is inactive", f"tick 'Active' on it ({scope}, Settings → "
                                                 "Webhooks)")
        if not config.get("secret"):
            bad = True
            yield problem(f"{name} has no secret: the daemon refuses unsigned deliveries",
                          "set its secret to github.webhook_secret")
        events = set(hook.events or [])
        if WEBHOOK_EVENT not in events and "*" not in events:
            bad = True
            yield problem(f"{name} does not deliver workflow_job (it sends "
                          f"{', '.join(sorted(events)) or 'nothing'})",
                          "edit it: 'Let me select individual events' → 'Workflow jobs'")
        if config.get("content_type") != "json":
            bad = True
            yield problem(f"{name} sends {config.get('content_type')} payloads",
                          "set its content type to application/json")
        if not bad:
            yield fine(f"{name}: active, signed, delivers workflow_job")


def _paged(gh: Github, path: str, key: str) -> Iterator[dict[str, Any]]:
    """A list endpoint PyGithub has no class for, page by page."""
    page = 1
    while True:
        _, data = gh.requester.requestJsonAndCheck(
            "GET", path, parameters={"per_page": "100", "page": str(page)})
        items = list(data.get(key) or [])
        yield from items
        if len(items) < 100:
            return
        page += 1


async def scale_set_findings(config: GitHubConfig, *, labels: Mapping[str, Sequence[str]],
                             host: str) -> list[Finding]:
    """Scale-set mode: the Actions service answers, the runner group exists, and each
    profile's scale set (if the daemon made it already) routes the profile's labels."""
    found: list[Finding] = []
    profiles = config.scale_set_profiles(labels)
    async with GitHubClient.from_config(config) as rest:
        for text in config.scopes:
            scope = Scope.parse(text)
            service = ActionsService(rest, scope)
            client = ScaleSetClient(service)
            try:
                group = await client.runner_group_id(config.runner_group)
                await service.admin()
                found.append(fine(f"{scope}: the Actions service admits us; runner group "
                                  f"{config.runner_group!r} is id {group}"))
                for profile in profiles:
                    found.append(await _scale_set(client, config, scope, group, profile,
                                                  labels[profile], host))
            except ForgeAuthError as exc:
                found.append(problem(f"{scope}: the Actions service refused us: {exc}",
                                     _permission_fix(config, scope)))
            except SnapfleetError as exc:
                found.append(problem(f"{scope}: scale sets: {exc}",
                                     "create the runner group (Settings → Actions → Runner "
                                     "groups) or set github.runner_group = \"default\""
                                     if "runner group" in str(exc) else
                                     "check github.api_url and the credentials' permissions"))
            finally:
                await service.close()
    return found


async def _scale_set(client: ScaleSetClient, config: GitHubConfig, scope: Scope, group: int,
                     profile: str, labels: Sequence[str], host: str) -> Finding:
    name = config.scale_set_name(profile, host)
    existing = await client.get_scale_set(group, name)
    if existing is None:
        return fine(f"{scope}: scale set {name} (profile {profile}) does not exist yet; the "
                    "daemon creates it when it starts")
    if set(existing.labels) != set(labels):
        return fine(f"{scope}: scale set {name} has labels {sorted(existing.labels)}; the "
                    f"daemon sets them to profile {profile}'s {sorted(labels)} when it starts")
    return fine(f"{scope}: scale set {name} (id {existing.id}) routes {sorted(labels)} to "
                f"profile {profile}")
