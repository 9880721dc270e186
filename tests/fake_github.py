"""A fake GitHub REST API: a real aiohttp server that checks every exchange against the spec.

Each request must match a method and path template of GitHub's published
OpenAPI description, with declared query parameters and a body that
validates against the operation's request schema; each response the fake
sends is validated against the schema for its status code. Mismatches are
answered 400 and recorded in ``violations``; tests assert that list is empty.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev extras
import jwt
from aiohttp import web


def _specs_dir() -> Path:
    """GitHub's published schemas: in `shared/specs` beside the checkout (as CI lays it
    out), or where SNAPFLEET_SPECS_DIR points."""
    candidates = [
        Path(os.environ.get("SNAPFLEET_SPECS_DIR", "/nonexistent")),
        Path(__file__).resolve().parents[2] / "shared" / "specs",
        Path("/work/shared/specs"),
    ]
    for candidate in candidates:
        if (candidate / "github-actions-runners.openapi.json").exists():
            return candidate
    raise FileNotFoundError("GitHub's OpenAPI specs not found; set SNAPFLEET_SPECS_DIR")


SPECS = _specs_dir()
REST_SPEC = SPECS / "github-actions-runners.openapi.json"
WEBHOOK_SPEC = SPECS / "github-workflow-job-webhooks.openapi.json"
# GitHub answers these on any operation, documented or not (auth, gone, limits, outages).
GENERIC_STATUSES = {401, 403, 404, 429, 500, 502, 503}
BASIC_ERROR = {"type": "object", "properties": {"message": {"type": "string"}}}
Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def oas30_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 schema → JSON Schema: ``nullable: true`` becomes a ``null`` type."""
    if isinstance(node, list):
        return [oas30_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: oas30_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:  # a nullable allOf/anyOf/oneOf
            return {"anyOf": [{"type": "null"}, out]}
    return out


@cache
def rest_spec() -> Json:
    """The REST spec with schemas converted to JSON Schema (no ``$ref``s in this file)."""
    spec: Json = json.loads(REST_SPEC.read_text())
    converted: Json = oas30_to_jsonschema(spec)
    return converted


@cache
def webhook_spec() -> Json:
    """The webhook spec (OpenAPI 3.1: its schemas are JSON Schema already)."""
    spec: Json = json.loads(WEBHOOK_SPEC.read_text())
    return spec


def schema_errors(instance: Any, schema: Json) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def synthesize(schema: Json) -> Any:
    """A small instance of ``schema``: required properties only, first choices, non-null."""
    if "allOf" in schema:
        merged: Json = {}
        for part in schema["allOf"]:
            value = synthesize(part)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return synthesize(options[0])
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return next(v for v in schema["enum"] if v is not None)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: synthesize(props.get(k, {"type": "string"})) for k in schema.get("required", [])}
    if kind == "array":
        return [synthesize(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        samples = {"date-time": "2024-05-01T12:00:00Z", "uri": "https://github.com/x"}
        return samples.get(str(schema.get("format")), "x")
    return {"integer": 1, "number": 1, "boolean": False}[kind]


@dataclass
class Operation:
    method: str
    template: str
    spec: Json
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        self.pattern = re.compile(f"^{regex}$")

    def params(self, where: str) -> dict[str, Json]:
        return {p["name"]: p for p in self.spec.get("parameters", []) if p["in"] == where}


# Webhook listing is not in the published actions-runners description: these two
# operations are shaped by hand from GitHub's REST docs ("List repository webhooks",
# "List organization webhooks"; the `hook` / `org-hook` objects), fields Snapfleet reads
# and their documented siblings, so requests and answers are still checked.
_HOOK_CONFIG = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "format": "uri"},
        "content_type": {"type": "string", "enum": ["json", "form"]},
        "secret": {"type": "string"},
        "insecure_ssl": {"type": "string", "enum": ["0", "1"]},
    },
}
_HOOK = {
    "type": "object",
    "required": ["type", "id", "name", "active", "events", "config", "updated_at",
                 "created_at", "url", "ping_url"],
    "properties": {
        "type": {"type": "string", "enum": ["Repository", "Organization"]},
        "id": {"type": "integer"},
        "name": {"type": "string", "const": "web"},
        "active": {"type": "boolean"},
        "events": {"type": "array", "items": {"type": "string"}},
        "config": _HOOK_CONFIG,
        "updated_at": {"type": "string", "format": "date-time"},
        "created_at": {"type": "string", "format": "date-time"},
        "url": {"type": "string"},
        "ping_url": {"type": "string"},
        "test_url": {"type": "string"},
        "deliveries_url": {"type": "string"},
        "last_response": {"type": "object"},
    },
}
_PAGING = [
    {"name": "per_page", "in": "query", "schema": {"type": "integer", "maximum": 100}},
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
]
_LISTED = {"200": {"content": {"application/json": {"schema": {"type": "array",
                                                               "items": _HOOK}}}}}
HOOK_OPERATIONS: Json = {
    "/repos/{owner}/{repo}/hooks": {"get": {
        "operationId": "repos/list-webhooks", "responses": _LISTED,
        "parameters": [{"name": "owner", "in": "path", "schema": {"type": "string"}},
                       {"name": "repo", "in": "path", "schema": {"type": "string"}},
                       *_PAGING]}},
    "/orgs/{org}/hooks": {"get": {
        "operationId": "orgs/list-webhooks", "responses": _LISTED,
        "parameters": [{"name": "org", "in": "path", "schema": {"type": "string"}},
                       *_PAGING]}},
}


@cache
def operations() -> list[Operation]:
    ops = [
        Operation(method.upper(), path, op)
        for path, item in [*rest_spec()["paths"].items(), *HOOK_OPERATIONS.items()]
        for method, op in item.items()
    ]
    # Literal segments first: ".../runners/downloads" is not runner "downloads".
    return sorted(ops, key=lambda op: op.template.count("{"))


def _coerce(raw: str, schema: Json) -> Any:
    kind = schema.get("type")
    if kind == "integer":
        return int(raw) if re.fullmatch(r"-?\d+", raw) else raw
    if kind == "boolean":
        return {"true": True, "false": False}.get(raw, raw)
    return raw


@dataclass
class Fault:
    """A canned answer for the next ``times`` requests matching ``method`` and ``path`` (regex)."""

    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: Json | None
    times: int


class Reply(Exception):
    def __init__(
        self, status: int, body: Json | list[Json] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FakeGitHub:
    """State and behaviour of the endpoints Snapfleet uses; see ``violations`` and ``requests``."""

    def __init__(self, *, prefix: str = "", clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.undocumented: list[str] = []
        self.tokens: dict[str, float] = {}
        self.apps: dict[int, tuple[str, bytes]] = {}
        self.token_ttl_s = 3600.0
        self.runners: dict[str, dict[int, Json]] = {}
        self.runs: dict[str, list[Json]] = {}
        self.jobs: dict[int, list[Json]] = {}
        self.jit_configs: dict[int, str] = {}
        self.faults: list[Fault] = []
        self.registration_tokens: dict[str, float] = {}
        self.installations: dict[int, Json] = {}
        """Installation id -> ``{"account": login, "permissions": {...}}``."""
        self.runner_groups: dict[str, list[Json]] = {}
        """Organization -> its runner groups (``Default``, id 1, unless set)."""
        self.hooks: dict[str, list[Json]] = {}
        """Scope (``owner/repo`` or ``org``) -> its webhooks."""
        self.pygithub = False
        """Accept what PyGithub sends and GitHub takes: no ``X-GitHub-Api-Version``
        header is the documented default version, any ``Accept``, ``token`` auth."""
        self.mounts: list[tuple[str, Handler]] = []
        self._ids = iter(range(1000, 10**9))
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{self.prefix}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def mount(self, path_prefix: str, handler: Handler) -> None:
        """Serve requests under ``path_prefix`` with ``handler``: another service on this
        server (the Actions service behind scale sets), outside the REST spec's checks."""
        self.mounts.append((path_prefix, handler))

    # -- state set-up for tests -------------------------------------------------

    def add_token(self, token: str) -> None:
        self.tokens[token] = float("inf")

    def add_installation(
        self, installation_id: int, app_id: int, public_key_pem: bytes, *,
        account: str = "octo-org", permissions: dict[str, str] | None = None,
    ) -> None:
        self.apps[installation_id] = (str(app_id), public_key_pem)
        self.installations[installation_id] = {
            "account": account,
            "permissions": permissions if permissions is not None else {
                "administration": "write", "organization_self_hosted_runners": "write",
                "actions": "read", "metadata": "read"},
        }

    def add_hook(self, scope: str, url: str, *, events: tuple[str, ...] = ("workflow_job",),
                 secret: bool = True, active: bool = True, content_type: str = "json") -> int:
        hook_id = next(self._ids)
        kind = "Organization" if "/" not in scope else "Repository"
        base = f"{self.url}/{'orgs' if kind == 'Organization' else 'repos'}/{scope}/hooks/{hook_id}"
        config = {"url": url, "content_type": content_type, "insecure_ssl": "0"}
        if secret:
            config["secret"] = "********"  # as GitHub shows a set secret
        self.hooks.setdefault(scope, []).append({
            "type": kind, "id": hook_id, "name": "web", "active": active, "events": list(events),
            "config": config, "updated_at": "2024-05-01T12:00:00Z",
            "created_at": "2024-05-01T12:00:00Z", "url": base, "ping_url": f"{base}/pings",
            "test_url": f"{base}/test", "deliveries_url": f"{base}/deliveries",
            "last_response": {"code": None, "status": "unused", "message": None},
        })
        return hook_id

    def add_runner_group(self, org: str, name: str) -> int:
        groups = self.runner_groups.setdefault(org, [_runner_group(1, "Default")])
        group_id = next(self._ids)
        groups.append(_runner_group(group_id, name))
        return group_id

    def add_runner(
        self,
        scope: str,
        name: str,
        *,
        status: str = "online",
        busy: bool = False,
        labels: tuple[str, ...] = ("self-hosted",),
    ) -> int:
        runner_id = next(self._ids)
        self.runners.setdefault(scope, {})[runner_id] = {
            "id": runner_id,
            "name": name,
            "os": "linux",
            "status": status,
            "busy": busy,
            "ephemeral": True,
            "labels": [{"id": i + 1, "name": n, "type": "custom"} for i, n in enumerate(labels)],
        }
        return runner_id

    def add_job(
        self,
        repo: str,
        labels: list[str],
        *,
        run_id: int | None = None,
        run_status: str = "queued",
        job_status: str = "queued",
    ) -> tuple[int, int]:
        """A job (and its run, unless ``run_id`` names an existing one); returns both ids."""
        example = _example("/repos/{owner}/{repo}/actions/runs", "get")["workflow_runs"][0]
        if run_id is None:
            run_id = next(self._ids)
            run = copy.deepcopy(example)
            run.update(id=run_id, status=run_status, conclusion=None)
            run["repository"]["full_name"] = repo
            self.runs.setdefault(repo, []).append(run)
        job = copy.deepcopy(
            _example("/repos/{owner}/{repo}/actions/runs/{run_id}/jobs", "get")["jobs"][0]
        )
        job_id = next(self._ids)
        job.update(
            id=job_id,
            run_id=run_id,
            status=job_status,
            labels=labels,
            conclusion=None,
            completed_at=None,
            runner_id=None,
            runner_name=None,
            runner_group_id=None,
            runner_group_name=None,
            created_at="2024-05-01T12:00:00Z",
            steps=[],
        )
        self.jobs.setdefault(run_id, []).append(job)
        return run_id, job_id

    def inject(
        self,
        method: str,
        path: str,
        status: int,
        *,
        headers: dict[str, str] | None = None,
        body: Json | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (after spec checks)."""
        if body is None and status >= 400:
            body = {"message": f"injected {status}"}
        self.faults.append(Fault(method, path, status, headers or {}, body, times))

    # -- the server ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        for prefix, handler in self.mounts:
            if path.startswith(prefix):
                return await handler(request)
        self.requests.append((request.method, path))
        op: Operation | None = None
        try:
            if not path.startswith(self.prefix + "/"):
                raise self._violation(f"{path} is not under {self.prefix!r}")
            op, params = self._match(request.method, path[len(self.prefix) :])
            body = await self._check_request(request, op)
            self._fault(request.method, path[len(self.prefix) :])
            self._authenticate(request, op)
            reply = self._dispatch(op, params, dict(request.query), body, request)
        except Reply as exc:
            reply = exc
        if op is not None:
            self._check_response(op, reply)
        if reply.body is None:
            return web.Response(status=reply.status, headers=reply.headers)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    def _violation(self, text: str) -> Reply:
        self.violations.append(text)
        return Reply(400, {"message": f"spec violation: {text}"})

    def _match(self, method: str, path: str) -> tuple[Operation, dict[str, Any]]:
        for op in operations():
            found = op.pattern.match(path)
            if found and op.method == method:
                declared = op.params("path")
                params = {
                    k: _coerce(v, declared[k]["schema"]) for k, v in found.groupdict().items()
                }
                for name, value in params.items():
                    if errors := schema_errors(value, declared[name]["schema"]):
                        raise self._violation(f"{method} {op.template}: path {name}: {errors}")
                return op, params
        raise self._violation(f"{method} {path} is not in the spec")

    async def _check_request(self, request: web.Request, op: Operation) -> Any:
        where = f"{op.method} {op.template}"
        wanted = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        if self.pygithub:
            wanted = {} if request.headers.get("X-GitHub-Api-Version") in (
                None, "2022-11-28") else {"X-GitHub-Api-Version": "2022-11-28"}
        for name, value in wanted.items():
            if request.headers.get(name) != value:
                raise self._violation(f"{where}: header {name} is {request.headers.get(name)!r}")
        if not request.headers.get("User-Agent", "").startswith("snapfleet/"):
            raise self._violation(f"{where}: User-Agent {request.headers.get('User-Agent')!r}")
        declared = op.params("query")
        for name, raw in request.query.items():
            if name not in declared:
                raise self._violation(f"{where}: query parameter {name} is not declared")
            if errors := schema_errors(
                _coerce(raw, declared[name]["schema"]), declared[name]["schema"]
            ):
                raise self._violation(f"{where}: query {name}: {errors}")
        raw_body = await request.read()
        spec_body = op.spec.get("requestBody")
        if spec_body is None:
            if raw_body:
                raise self._violation(f"{where}: takes no body")
            return None
        if not raw_body:
            if spec_body.get("required"):
                raise self._violation(f"{where}: body is required")
            return None
        try:
            body = json.loads(raw_body)
        except json.JSONDecodeError:
            raise self._violation(f"{where}: body is not JSON") from None
        if errors := schema_errors(body, spec_body["content"]["application/json"]["schema"]):
            raise self._violation(f"{where}: body: {errors}")
        return body

    def _check_response(self, op: Operation, reply: Reply) -> None:
        if reply.status == 400 and reply.body and "spec violation" in str(reply.body):
            return
        where = f"{op.method} {op.template} -> {reply.status}"
        documented = op.spec["responses"].get(str(reply.status))
        if documented is None:
            if reply.status not in GENERIC_STATUSES:
                self.violations.append(f"{where}: status not in the spec")
                return
            self.undocumented.append(where)
            documented = {"content": {"application/json": {"schema": BASIC_ERROR}}}
        content = documented.get("content")
        if content is None:
            if reply.body is not None:
                self.violations.append(f"{where}: spec says no body")
            return
        if errors := schema_errors(reply.body, content["application/json"]["schema"]):
            self.violations.append(f"{where}: response: {errors}")

    def _fault(self, method: str, path: str) -> None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and re.fullmatch(fault.path, path):
                fault.times -= 1
                raise Reply(fault.status, fault.body, fault.headers)

    def _authenticate(self, request: web.Request, op: Operation) -> None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        # GitHub takes `token <t>` too (PyGithub's way); our own client must say Bearer.
        if scheme != "Bearer" and not (self.pygithub and scheme == "token"):
            raise Reply(401, {"message": "Requires authentication"})
        if op.template.startswith("/app/"):
            parts = request.match_info["tail"].split("/")
            found = parts[parts.index("installations") + 1] if "installations" in parts else ""
            installation = int(found) if found.isdigit() else 0
            app_id, public_key = self.apps.get(installation, ("", b""))
            if not public_key:  # not an installation we know: the JWT still names its App
                try:
                    issuer = str(jwt.decode(credential, options={"verify_signature": False})
                                 .get("iss", ""))
                except jwt.PyJWTError:
                    issuer = ""
                app_id, public_key = next(((a, k) for a, k in self.apps.values()
                                           if a == issuer), ("", b""))
            try:
                # Times are checked below against the fake's clock, not the real one.
                claims = jwt.decode(
                    credential,
                    public_key,
                    algorithms=["RS256"],
                    issuer=app_id,
                    options={"verify_exp": False, "verify_iat": False, "require": ["iat", "exp"]},
                )
            except (jwt.PyJWTError, ValueError):
                raise Reply(401, {"message": "A JSON web token could not be decoded"}) from None
            now = self.clock()
            if not claims["iat"] <= now < claims["exp"] or claims["exp"] - claims["iat"] > 600:
                raise Reply(401, {"message": "'Expiration time' claim ('exp') is too far"})
            return
        if self.tokens.get(credential, 0.0) <= self.clock():
            raise Reply(401, {"message": "Bad credentials"})

    # -- endpoints ----------------------------------------------------------------

    def _dispatch(
        self,
        op: Operation,
        params: dict[str, Any],
        query: dict[str, str],
        body: Any,
        request: web.Request,
    ) -> Reply:
        scope = f"{params['owner']}/{params['repo']}" if "repo" in params else params.get("org", "")
        name = op.spec["operationId"]
        if name == "apps/create-installation-access-token":
            if params["installation_id"] not in self.apps:
                return Reply(404, {"message": "Not Found"})
            token = "ghs_" + secrets.token_hex(16)
            self.tokens[token] = self.clock() + self.token_ttl_s
            expires = datetime.fromtimestamp(self.tokens[token], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return Reply(201, {"token": token, "expires_at": expires})
        if name == "apps/get-installation":
            return self._installation(op, params["installation_id"])
        if name == "rate-limit/get":
            return Reply(200, synthesize(
                op.spec["responses"]["200"]["content"]["application/json"]["schema"]))
        if name == "actions/list-self-hosted-runner-groups-for-org":
            groups = self.runner_groups.get(scope, [_runner_group(1, "Default")])
            return self._page(request, query, "runner_groups", groups)
        if name == "actions/get-self-hosted-runner-group-for-org":
            for group in self.runner_groups.get(scope, [_runner_group(1, "Default")]):
                if group["id"] == params["runner_group_id"]:
                    return Reply(200, group)
            return Reply(404, {"message": "Not Found"})
        if name in ("repos/list-webhooks", "orgs/list-webhooks"):
            per_page, page = int(query.get("per_page", 30)), int(query.get("page", 1))
            return Reply(200, self.hooks.get(scope, [])[(page - 1) * per_page:page * per_page])
        if name.startswith("actions/create-registration-token-for"):
            token = "AABB" + secrets.token_hex(12).upper()
            self.registration_tokens[token] = self.clock() + 3600
            until = datetime.fromtimestamp(self.registration_tokens[token], UTC)
            return Reply(201, {"token": token,
                               "expires_at": until.strftime("%Y-%m-%dT%H:%M:%SZ")})
        if name.startswith("actions/generate-runner-jitconfig"):
            if any(r["name"] == body["name"] for r in self.runners.get(scope, {}).values()):
                return Reply(
                    409, {"message": "Already exists - A runner with the name already exists."}
                )
            runner_id = self.add_runner(
                scope, body["name"], status="offline", labels=tuple(body["labels"])
            )
            runner = self.runners[scope][runner_id]
            runner["runner_group_id"] = body["runner_group_id"]
            blob = {
                "runner_id": runner_id,
                "secret": secrets.token_hex(16),
                "work": body.get("work_folder"),
            }
            config = base64.b64encode(json.dumps(blob).encode()).decode()
            self.jit_configs[runner_id] = config
            return Reply(201, {"runner": runner, "encoded_jit_config": config})
        if name.startswith("actions/list-self-hosted-runners-for"):
            items = [
                r
                for r in self.runners.get(scope, {}).values()
                if query.get("name") in (None, r["name"])
            ]
            return self._page(request, query, "runners", items)
        if name.startswith("actions/delete-self-hosted-runner-from"):
            found = self.runners.get(scope, {}).get(params["runner_id"])
            if found is None:
                return Reply(404, {"message": "Not Found"})
            if found["busy"]:
                return Reply(
                    422,
                    {
                        "message": "Bad request - Runner is still running a job",
                        "documentation_url": "https://docs.github.com/rest",
                    },
                )
            del self.runners[scope][params["runner_id"]]
            return Reply(204)
        if name == "actions/list-workflow-runs-for-repo":
            runs = [
                r for r in self.runs.get(scope, []) if query.get("status") in (None, r["status"])
            ]
            return self._page(request, query, "workflow_runs", runs)
        if name == "actions/get-job-for-workflow-run":
            for jobs in self.jobs.values():
                for job in jobs:
                    if job["id"] == params["job_id"]:
                        return Reply(200, job)
            return Reply(404, {"message": "Not Found"})
        if name == "actions/list-jobs-for-workflow-run":
            return self._page(request, query, "jobs", self.jobs.get(params["run_id"], []))
        return Reply(501, {"message": f"the fake does not implement {name}"})

    def _installation(self, op: Operation, installation_id: int) -> Reply:
        known = self.installations.get(installation_id)
        if known is None:
            return Reply(404, {"message": "Not Found"})
        schema = op.spec["responses"]["200"]["content"]["application/json"]["schema"]
        body = synthesize(schema)
        account = synthesize(schema["properties"]["account"])  # a Simple User's shape
        account.update(login=known["account"], type="Organization")
        body.update(id=installation_id, app_id=int(self.apps[installation_id][0]),
                    account=account, permissions=known["permissions"],
                    target_type="Organization")
        return Reply(200, body)

    def _page(
        self, request: web.Request, query: dict[str, str], key: str, items: list[Json]
    ) -> Reply:
        per_page, page = int(query.get("per_page", 30)), int(query.get("page", 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            # Like GitHub: absolute URLs that keep the original query.
            next_url = request.url.update_query(page=page + 1)
            headers["Link"] = f'<{next_url}>; rel="next"'
        return Reply(200, {"total_count": len(items), key: chunk}, headers)


def _runner_group(group_id: int, name: str) -> Json:
    return {"id": group_id, "name": name, "visibility": "all", "default": group_id == 1,
            "runners_url": f"https://api.github.com/orgs/x/actions/runner-groups/{group_id}"
                           "/runners",
            "inherited": False, "allows_public_repositories": True}


def _example(path: str, method: str) -> Json:
    response = rest_spec()["paths"][path][method]["responses"]["200"]
    value: Json = response["content"]["application/json"]["examples"]["default"]["value"]
    return value


def iter_webhook_schemas() -> Iterator[tuple[str, Json]]:
    for name, item in webhook_spec()["webhooks"].items():
        yield name, item["post"]["requestBody"]["content"]["application/json"]["schema"]
