"""``snapfleet gitlab register|unregister|check``: a GitLab runner for the direct job source.

``register`` creates a runner with GitLab's runner-creation workflow
(``POST /user/runners`` through python-gitlab) from a personal, group or
project access token that is read from ``--token-file`` or stdin, used for
this one registration and never stored or shown. The ``glrt-`` runner token
GitLab returns is written 0600 under ``<state_dir>/credentials/`` (or
``--output``), and the config section to use it is printed. ``unregister``
deletes the runner with its own token (``DELETE /runners``) and removes the
file; ``check`` verifies the token (``POST /runners/verify``) and says what is
wrong. python-gitlab is synchronous: it runs in a thread, and its exceptions
become ``runner.errors`` forge errors here.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gitlab
import gitlab.exceptions
import gitlab.v4.objects

from runner.config import load_settings
from runner.errors import ConfigError, ForgeAuthError, ForgeError, ForgeUnavailable
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.config import default_system_id, read_runner_token
from runner.private_file import write_private
from runner.secret import Secret

FORGE = "gitlab"
_TAG = re.compile(r"^[^,\s][^,]*$")


async def main(args: argparse.Namespace) -> int:
    """Run ``snapfleet gitlab <action>``."""
    url = _check_url(args.url)
    credentials = load_settings(args.config).paths.state_dir / "credentials"
    if args.action == "register":
        return await register(args, url, credentials)
    path = args.runner_token_file or _find_token_file(credentials, url)
    if args.action == "unregister":
        return await unregister(url, path)
    return await check(url, path)


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--url", f"expected an http(s) URL of GitLab, got {url!r}")
    if parts.username or parts.password:
        raise ConfigError("--url", "must not carry credentials")
    return url.rstrip("/")


def _host_slug(url: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}{f'-{parts.port}' if parts.port else ''}{parts.path}"
    return re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-")


def _find_token_file(credentials: Path, url: str) -> Path:
    found = sorted(credentials.glob(f"gitlab-{_host_slug(url)}-*.token"))
    if len(found) != 1:
        what = "no stored runner token" if not found else f"{len(found)} stored runner tokens"
        raise ConfigError("--runner-token-file",
                          f"{what} for {url} in {credentials}; name one with --runner-token-file")
    return found[0]


def _read_access_token(path: Path | None) -> Secret:
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--token-file", f"cannot read {path}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        text = getpass.getpass("GitLab access token (not echoed, not stored): ")
    else:
        text = sys.stdin.readline()
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError("--token-file", "the access token is empty or malformed")
    return Secret(token)


def _translate(exc: Exception, what: str) -> ForgeError:
    """A python-gitlab / requests failure as a Snapfleet forge error (no token in it)."""
    if isinstance(exc, OSError):  # requests' exceptions are OSErrors
        return ForgeUnavailable(f"{what}: cannot reach GitLab: {type(exc).__name__}", forge=FORGE)
    if isinstance(exc, gitlab.exceptions.GitlabError):
        code = exc.response_code
        message = f"{what}: {code or ''} {str(exc.error_message)[:200]}".strip()
        if code in (401, 403):
            return ForgeAuthError(message, forge=FORGE, status=code)
        if code is not None and (code == 429 or code >= 500):
            return ForgeUnavailable(message, forge=FORGE, status=code)
        return ForgeError(message, forge=FORGE, status=code)
    raise exc


def _create_runner(url: str, access: Secret, params: dict[str, Any],
                   group: str | None, project: str | None) -> dict[str, Any]:
    gl = gitlab.Gitlab(url, private_token=access.reveal(), retry_transient_errors=True)
    try:
        if group is not None:
            params["group_id"] = int(group) if group.isdigit() else gl.groups.get(group).id
        if project is not None:
            params["project_id"] = (int(project) if project.isdigit()
                                    else gl.projects.get(project).id)
        runner = gitlab.v4.objects.CurrentUserRunnerManager(gl).create(params)
    except (gitlab.exceptions.GitlabError, OSError) as exc:
        raise _translate(exc, "POST /user/runners") from None
    finally:
        gl.session.close()
    attrs: dict[str, Any] = runner.attributes
    return attrs


async def register(args: argparse.Namespace, url: str, credentials: Path) -> int:
    """Create the runner, store its token, print the config section."""
    tags = [t.strip() for t in args.tag]
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        raise ConfigError("--tag", f"tags must be non-empty and contain no commas: {bad}")
    if not tags and not args.run_untagged:
        raise ConfigError("--tag", "give at least one --tag, or --run-untagged")
    access = _read_access_token(args.token_file)
    kind = "group_type" if args.group else "project_type" if args.project else "instance_type"
    params: dict[str, Any] = {
        "runner_type": kind, "description": args.description, "tag_list": tags,
        "run_untagged": args.run_untagged, "locked": args.locked, "paused": args.paused,
    }
    if args.maximum_timeout:
        params["maximum_timeout"] = args.maximum_timeout
    # Where the token goes must be writable before GitLab makes a runner whose token
    # would otherwise be lost (an orphan runner nobody can use or delete with it).
    directory = args.output.parent if args.output else credentials
    _check_writable(directory, "--output" if args.output else "paths.state_dir")
    created = await asyncio.to_thread(_create_runner, url, access, params, args.group,
                                      args.project)
    del access  # used once: nothing below may see it
    runner_id, token = created.get("id"), created.get("token")
    if not isinstance(runner_id, int) or not isinstance(token, str) or not token:
        raise ForgeError("POST /user/runners: answer has no runner id and token", forge=FORGE)
    path = args.output or credentials / f"gitlab-{_host_slug(url)}-{runner_id}.token"
    try:
        write_private(path, token + "\n", parent_mode=None if path.parent.exists() else 0o700)
    except OSError as exc:
        await _undo_registration(url, Secret(token), runner_id)
        raise ConfigError("--output" if args.output else "paths.state_dir",
                          f"cannot write the runner token to {path}: {exc.strerror or exc};"
                          f" runner {runner_id} was deleted again") from None
    print(f"Registered GitLab runner {runner_id} ({kind}); its token is in {path} (0600).")
    print("Add this to the Snapfleet config (or point LoadCredential= at the file):\n")
    print(config_section(url, runner_id, path, tags, args.run_untagged))
    return 0


def _check_writable(directory: Path, key: str) -> None:
    """Make ``directory`` (0700 if new) and prove a file can be written in it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".snapfleet-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot write the runner token in {directory}:"
                               f" {exc.strerror or exc}; nothing was registered") from None


async def _undo_registration(url: str, token: Secret, runner_id: int) -> None:
    try:
        await asyncio.to_thread(_delete_runner, url, token)
    except ForgeError as exc:
        print(f"could not delete runner {runner_id} again ({exc}): delete it in GitLab's"
              " runner settings", file=sys.stderr)


def config_section(url: str, runner_id: int, token_file: Path, tags: list[str],
                   run_untagged: bool) -> str:
    """The TOML for one runner of the direct GitLab source (no secret in it)."""
    quoted = ", ".join(_toml_str(t) for t in tags)
    return "\n".join([
        "[[gitlab.runners]]",
        f"url = {_toml_str(url)}",
        f"runner_id = {runner_id}",
        f"token_file = {_toml_str(str(token_file))}",
        f"tags = [{quoted}]",
        f"run_untagged = {'true' if run_untagged else 'false'}",
    ])


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'



def _delete_runner(url: str, token: Secret) -> None:
    gl = gitlab.Gitlab(url, retry_transient_errors=True)
    try:
        gl.http_request("delete", "/runners", post_data={"token": token.reveal()})
    except (gitlab.exceptions.GitlabError, OSError) as exc:
        raise _translate(exc, "DELETE /runners") from None
    finally:
        gl.session.close()


async def unregister(url: str, path: Path) -> int:
    """Delete the runner with its own token, then the stored token."""
    token = read_runner_token(path)
    try:
        await asyncio.to_thread(_delete_runner, url, token)
    except ForgeAuthError:
        print(f"GitLab does not know this runner token any more; removing {path}.",
              file=sys.stderr)
    path.unlink()
    print(f"Unregistered the runner; removed {path}.")
    return 0


async def check(url: str, path: Path) -> int:
    """Verify the stored token; exit 0 when GitLab accepts it, 1 with the reason if not."""
    token = read_runner_token(path)
    async with GitLabClient(url) as client:
        try:
            runner_id = await client.verify(token, system_id=default_system_id())
        except ForgeAuthError:
            print(f"FAIL: GitLab rejected the runner token in {path}: the runner was deleted or"
                  " its token was reset. Run `snapfleet gitlab register` again.")
            return 1
        except ForgeUnavailable as exc:
            print(f"FAIL: cannot reach GitLab at {url}: {exc}")
            return 1
    shown = f" (runner {runner_id})" if runner_id is not None else ""
    print(f"OK: GitLab at {url} accepts the runner token in {path}{shown}.")
    return 0
