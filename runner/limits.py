"""What a job may hold: the checks every entry point applies before anything runs.

A job enters through the API, ``snapfleet run``/``submit``, a GitHub webhook or
a GitLab custom-executor stage; each validates with these (through
`runner.service.jobs.JobSpec` and `ExecRequest`), so a job the guest agent
could not carry or start is refused with its reason before a VM is restored.
Pure: no I/O, no logging.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final

from pydantic import AfterValidator, Field

from runner.agent.messages import MAX_FRAME_SIZE

MAX_TIMEOUT_S: Final = 7 * 24 * 3600.0
"""Longest wall-clock limit a job or profile may ask for (a week)."""
AGENT_HEADROOM: Final = 64 * 1024
"""Room left in the agent's one frame for the rest of the exec message and secret env."""
MAX_JOB_BYTES: Final = MAX_FRAME_SIZE - AGENT_HEADROOM
"""Largest script/command, env and workdir together, as JSON-encoded for the agent."""
MAX_JSON_DEPTH: Final = 64
"""Deepest nesting accepted in a JSON document (a job spec is 2 deep, a webhook ~6)."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _env_key(key: str) -> str:
    if not key:
        raise ValueError("an environment variable name must not be empty")
    if "=" in key:
        raise ValueError("an environment variable name must not contain '='")
    return _no_nul(key)


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string the guest can take: no NUL byte (C strings end there)."""
EnvKey = Annotated[str, AfterValidator(_env_key)]
"""An environment variable name: not empty, no ``=``, no NUL byte."""
Env = dict[EnvKey, Text]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
"""A wall-clock limit in seconds: finite, positive, at most `MAX_TIMEOUT_S`."""


def check_fits_agent(
    *,
    argv: Sequence[str] | None = None,
    script: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> None:
    """Raise ValueError naming the limit unless these fit in one agent exec frame.

    Measured as the agent encodes them (JSON, ASCII-escaped), so escapes and
    non-ASCII text count at their real size.
    """
    fields = {"argv": argv and list(argv), "script": script, "env": dict(env or {}), "cwd": cwd}
    size = len(json.dumps(fields, separators=(",", ":")))
    if size > MAX_JOB_BYTES:
        raise ValueError(
            f"the script or command, env and workdir take {size} bytes as sent to the guest"
            f" agent; the limit is {MAX_JOB_BYTES} bytes ({MAX_JOB_BYTES // 1024} KiB): put"
            " large content in the image or fetch it from the job"
        )


def load_json(text: str | bytes) -> Any:
    """Parse a JSON document from outside; ValueError (with the reason) if it is not
    strict JSON (no NaN or Infinity) or nests deeper than `MAX_JSON_DEPTH`."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_depth(value)
    return value


def check_depth(value: object) -> None:
    """Raise ValueError if lists and objects in ``value`` nest deeper than `MAX_JSON_DEPTH`."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")
