"""Webhook deliveries, pure: signatures, parsing of schema-valid payloads, dedupe."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from runner.errors import ConfigError, WebhookError, WebhookSignatureError
from runner.forge.github.webhook import (
    DeliveryDedupe,
    Ignored,
    Ping,
    WorkflowJobEvent,
    parse_event,
    verify_signature,
)
from tests.fake_github import schema_errors, synthesize, webhook_spec

SECRET = b"It's a Secret to Everybody"
ACTIONS = {
    "queued": "workflow-job-queued",
    "in_progress": "workflow-job-in-progress",
    "completed": "workflow-job-completed",
    "waiting": "workflow-job-waiting",
}


def schema(hook: str) -> dict[str, Any]:
    post = webhook_spec()["webhooks"][hook]["post"]
    result: dict[str, Any] = post["requestBody"]["content"]["application/json"]["schema"]
    return result


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def job_payload(action: str, *, org: bool = True, installation: bool = True) -> dict[str, Any]:
    """A minimal payload for ``action`` that validates against GitHub's webhook schema."""
    hook_schema = schema(ACTIONS[action])
    payload: dict[str, Any] = synthesize(hook_schema)
    payload["action"] = action
    payload["repository"].update(full_name="octo-org/hello", name="hello")
    payload["repository"]["owner"]["login"] = "octo-org"
    running = action in ("in_progress", "completed")
    payload["workflow_job"].update(
        id=399444496,
        run_id=29679449,
        status=action,
        labels=["self-hosted", "snapfleet", "gpu"],
        html_url="https://github.com/octo-org/hello/actions/runs/29679449/job/399444496",
        runner_name="snapfleet-h1-gpu-7" if running else None,
        runner_id=23 if running else None,
        conclusion="success" if action == "completed" else None,
        completed_at="2024-05-01T12:05:00Z" if action == "completed" else None,
    )
    if org:
        payload["organization"] = synthesize(hook_schema["properties"]["organization"])
        payload["organization"]["login"] = "octo-org"
    if installation:
        payload["installation"] = {"id": 42, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9uNDI="}
    assert schema_errors(payload, hook_schema) == [], "the test payload must be realistic"
    return payload


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


# -- signatures ---------------------------------------------------------------------


def test_github_documented_signature_example_verifies() -> None:
    # The example from GitHub's "Validating webhook deliveries" page.
    header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    verify_signature(SECRET, b"Hello, World!", header)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("sha1=" + "0" * 40, "sha256="),
        ("sha256=zz", "hex digest"),
        ("sha256=" + "ab" * 16, "hex digest"),
        ("sha256=" + "0" * 64, "does not match"),
        (sign(b"other body"), "does not match"),
        (sign(b"body", b"wrong secret"), "does not match"),
    ],
)
def test_bad_signatures_are_refused(header: str | None, reason: str) -> None:
    with pytest.raises(WebhookSignatureError, match=reason):
        verify_signature(SECRET, b"body", header)


def test_signature_accepts_uppercase_hex_and_needs_a_secret() -> None:
    verify_signature(SECRET, b"body", sign(b"body").upper().replace("SHA256=", "sha256="))
    with pytest.raises(ConfigError):
        verify_signature(b"", b"body", sign(b"body"))


def test_signature_error_is_a_webhook_error() -> None:
    # Handlers answer 401 for the subclass, 400 for any other WebhookError.
    assert issubclass(WebhookSignatureError, WebhookError)


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("action", list(ACTIONS))
def test_workflow_job_events_parse(action: str) -> None:
    event = parse_event("workflow_job", "d-1", encode(job_payload(action)))
    assert isinstance(event, WorkflowJobEvent)
    assert event.action == action
    assert (event.job_id, event.run_id) == (399444496, 29679449)
    assert (event.repo, event.owner, event.installation_id) == ("octo-org/hello", "octo-org", 42)
    assert event.labels == ("self-hosted", "snapfleet", "gpu")
    assert event.delivery_id == "d-1"
    assert event.html_url is not None
    if action in ("in_progress", "completed"):
        assert (event.runner_name, event.runner_id) == ("snapfleet-h1-gpu-7", 23)
    else:
        assert (event.runner_name, event.runner_id) == (None, None)
    assert event.conclusion == ("success" if action == "completed" else None)


def test_user_repository_without_org_or_installation() -> None:
    event = parse_event(
        "workflow_job", "d", encode(job_payload("queued", org=False, installation=False))
    )
    assert isinstance(event, WorkflowJobEvent)
    assert (event.owner, event.installation_id) == ("octo-org", None)


def test_number_typed_ids_from_the_schema() -> None:
    # The schema types run_id (and runner_id on completed) as "number", not "integer".
    payload = job_payload("completed")
    payload["workflow_job"].update(run_id=29679449.0, runner_id=23.0)
    assert schema_errors(payload, schema("workflow-job-completed")) == []
    event = parse_event("workflow_job", "d", encode(payload))
    assert isinstance(event, WorkflowJobEvent)
    assert (event.run_id, event.runner_id) == (29679449, 23)


def test_null_labels_are_dropped() -> None:
    # One allOf branch of the completed schema allows null label items; be lenient.
    payload = job_payload("completed")
    payload["workflow_job"]["labels"] = ["a", None]
    event = parse_event("workflow_job", "d", encode(payload))
    assert isinstance(event, WorkflowJobEvent)
    assert event.labels == ("a",)


def mutate(path: str, value: Any) -> bytes:
    payload = job_payload("queued")
    *parents, last = path.split(".")
    node = payload
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return encode(payload)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (mutate("workflow_job", KeyError), "workflow_job"),
        (mutate("workflow_job.id", KeyError), "workflow_job.id"),
        (mutate("workflow_job.id", "12"), "workflow_job.id"),
        (mutate("workflow_job.id", True), "workflow_job.id"),
        (mutate("workflow_job.run_id", 1.5), "workflow_job.run_id"),
        (mutate("workflow_job.labels", "gpu"), "workflow_job.labels"),
        (mutate("workflow_job.labels", [1]), "workflow_job.labels"),
        (mutate("workflow_job.runner_name", 5), "workflow_job.runner_name"),
        (mutate("repository.full_name", KeyError), "repository.full_name"),
        (mutate("repository", []), "repository"),
        (mutate("organization.login", KeyError), "organization.login"),
        (mutate("installation.id", KeyError), "installation.id"),
        (mutate("action", KeyError), "action"),
    ],
)
def test_invalid_payloads_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(WebhookError) as info:
        parse_event("workflow_job", "d", body)
    assert info.value.field == field
    assert field in str(info.value)
    assert not isinstance(info.value, WebhookSignatureError)


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b"\xff\xfe",
    b"[" * 100_000 + b"]" * 100_000,  # deep enough to exhaust the parser's recursion
    b'{"a":' * 70 + b"1" + b"}" * 70,  # parses, but deeper than any webhook payload
    b'{"action": NaN}',
])
def test_bodies_that_are_not_json_objects(body: bytes) -> None:
    with pytest.raises(WebhookError, match="JSON"):
        parse_event("workflow_job", "d", body)


def test_ping_from_the_schema_example() -> None:
    content = webhook_spec()["webhooks"]["ping"]["post"]["requestBody"]["content"]
    example = content["application/json"]["examples"]["default"]["value"]
    assert schema_errors(example, content["application/json"]["schema"]) == []
    event = parse_event("ping", "d-ping", encode(example))
    assert event == Ping("d-ping", 109948940, "Anything added dilutes everything else.")


def test_unknown_events_and_actions_are_ignored() -> None:
    assert parse_event("push", "d", b"not even json") == Ignored(
        "d", "push", "event 'push' is not handled"
    )
    body = mutate("action", "requested")
    event = parse_event("workflow_job", "d", body)
    assert isinstance(event, Ignored)
    assert "requested" in event.reason


# -- dedupe -------------------------------------------------------------------------


def test_dedupe_remembers_deliveries() -> None:
    dedupe = DeliveryDedupe()
    assert not dedupe.seen("a")
    assert dedupe.seen("a")
    assert not dedupe.seen("b")


def test_dedupe_forgets_after_ttl() -> None:
    now = [0.0]
    dedupe = DeliveryDedupe(ttl_s=60, clock=lambda: now[0])
    assert not dedupe.seen("a")
    now[0] = 59.0
    assert dedupe.seen("a")
    now[0] = 60.0
    assert not dedupe.seen("a")
    assert len(dedupe) == 1


def test_dedupe_is_bounded() -> None:
    dedupe = DeliveryDedupe(max_entries=3)
    for delivery in "abcd":
        assert not dedupe.seen(delivery)
    assert len(dedupe) == 3
    assert not dedupe.seen("a")  # evicted as the oldest
    assert dedupe.seen("d")
