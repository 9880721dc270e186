"""Fetching a GitLab job's source in its guest, as gitlab-runner does. No I/O.

`get_sources` gives the job script's ``get_sources`` section (it runs inside
`runner.forge.gitlab.script`'s prelude, using its ``__sf_*`` helpers):
``GIT_STRATEGY`` clone/fetch/none/empty, ``refspecs`` and ``depth`` as GitLab
sends them, ``GIT_CHECKOUT``, ``GIT_CLEAN_FLAGS`` / ``GIT_FETCH_EXTRA_FLAGS``
(``none``: no flags), submodules (``GIT_SUBMODULE_STRATEGY``) and the job's
``hooks`` (``pre_get_sources_script`` before the fetch, ``post_get_sources_script``
after the checkout; neither runs when there is no fetch, as in gitlab-runner). The remote URL
carries no credentials: the job token reaches git through a credential helper
that reads it from that step's environment, only for GitLab's own host.
"""

from __future__ import annotations

import shlex
from urllib.parse import unquote, urlsplit, urlunsplit

from runner.forge.gitlab.payload import JobPayload

_q = shlex.quote


def _git_remote(url: str) -> tuple[str, str, str]:
    """``(url without credentials, user, password)`` from GitLab's ``repo_url``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
    return clean, unquote(parts.username or ""), unquote(parts.password or "")


def _flags(job: JobPayload, name: str, default: list[str]) -> list[str]:
    """A flags variable (``GIT_CLEAN_FLAGS``, ...) split as the shell would; ``none``: no
    flags (the step is skipped where it has no meaning without them)."""
    value = job.variable(name)
    if value is None or not value.strip():
        return default
    return [] if value.strip() == "none" else shlex.split(value)


def get_sources(job: JobPayload) -> list[str]:
    """The ``get_sources`` section: script lines that fetch and check out the job's
    commit into ``$CI_PROJECT_DIR`` (or skip, per ``GIT_STRATEGY``)."""
    git = job.git_info
    strategy = (job.variable("GIT_STRATEGY") or ("fetch" if job.allow_git_fetch else "clone"))
    out = ['__sf_section_start get_sources "Getting source from Git repository"']
    if strategy in ("none", "empty"):
        if strategy == "empty":
            out.append('rm -rf "$CI_PROJECT_DIR"')
        out.append('mkdir -p "$CI_PROJECT_DIR"')
        out.append(f"__sf_note {_q(f'Skipping Git repository setup (GIT_STRATEGY={strategy})')}")
        out.append('__sf_section_end get_sources')
        return out
    url, user, password = _git_remote(git.repo_url)
    fetch = ["git", "fetch", "origin", *_flags(job, "GIT_FETCH_EXTRA_FLAGS", ["--prune"]),
             "--no-recurse-submodules"]
    if git.depth > 0:
        fetch += ["--depth", str(git.depth)]
    fetch += git.refspecs or [f"+{git.sha}"]
    clean = _flags(job, "GIT_CLEAN_FLAGS", ["-ffdx"])
    checkout = (job.variable("GIT_CHECKOUT") or "true").lower() != "false"
    depth_note = f"Fetching changes with git depth set to {git.depth}..." if git.depth else (
        "Fetching changes...")
    reuse = strategy == "fetch"
    parts = urlsplit(url)
    body = [
        "set -u",
        # The credential helper answers only for GitLab's own host (a submodule elsewhere
        # must not get the job token) and reads the token from the environment: its argv
        # holds the variable's name, not its value.
        "export GIT_TERMINAL_PROMPT=0 GIT_CONFIG_COUNT=3",
        "export GIT_CONFIG_KEY_0=credential.helper GIT_CONFIG_VALUE_0=",
        "export GIT_CONFIG_KEY_1="
        + _q(f"credential.{parts.scheme}://{parts.netloc}.helper") + " GIT_CONFIG_VALUE_1="
        + _q('!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
             '"$__SF_GIT_USER" "$__SF_GIT_PASSWORD"; }; f'),
        "export GIT_CONFIG_KEY_2=advice.detachedHead GIT_CONFIG_VALUE_2=false",
        ('if [ -d "$CI_PROJECT_DIR/.git" ]; then echo "Reinitialized existing Git repository"; '
         'else rm -rf "$CI_PROJECT_DIR"; mkdir -p "$CI_PROJECT_DIR"; '
         'echo "Created fresh repository."; fi') if reuse else
        ('rm -rf "$CI_PROJECT_DIR" && mkdir -p "$CI_PROJECT_DIR" && '
         'echo "Created fresh repository."'),
        'cd "$CI_PROJECT_DIR" || exit 1',
        "git init -q 2>/dev/null || git init || exit 1",
        "git remote remove origin >/dev/null 2>&1",
        f"git remote add origin {_q(url)} || exit 1",
        *_hook(job, "pre_get_sources_script"),
        f"echo {_q(depth_note)}",
        shlex.join(fetch) + " || exit 1",
    ]
    if checkout:
        body += [
            f"echo {_q(f'Checking out {git.sha[:8]} as detached HEAD (ref is {git.ref})...')}",
            f"git checkout -f -q {_q(git.sha)} || exit 1",
        ]
        if clean:
            body.append(shlex.join(["git", "clean", *clean, "-q"]) + " || exit 1")
        body += _submodules(job, clean)
        body += _hook(job, "post_get_sources_script")
    else:
        body.append(f"__sf_note {_q('Skipping Git checkout (GIT_CHECKOUT=false)')}")
    out += [
        f"printf '%s' {_q(chr(10).join(body) + chr(10))} > \"$__sf_work/steps/get_sources.sh\"",
        # The token only in this step's environment, never in a file or an argv.
        f"__SF_GIT_USER={_q(user)} __SF_GIT_PASSWORD={_q(password)} __sf_main get_sources 0 "
        '"$__sf_work/steps/get_sources.sh" "$__sf_work"',
        'if [ "$__sf_rc" != 0 ] && [ "$__sf_expired" = 0 ]; then',
        '  __sf_error "ERROR: Getting the source failed (exit code $__sf_rc)"',
        '  __sf_status=failed __sf_failed=1 __sf_exit=$__sf_rc __sf_step=get_sources',
        "fi",
        '__sf_section_end get_sources',
    ]
    return out


def _submodules(job: JobPayload, clean: list[str]) -> list[str]:
    """gitlab-runner's ``GIT_SUBMODULE_STRATEGY`` (``normal``, ``recursive``), fetched
    with the same credentials as the project."""
    strategy = (job.variable("GIT_SUBMODULE_STRATEGY") or "none").strip()
    if strategy not in ("normal", "recursive"):
        return []
    recursive = ["--recursive"] if strategy == "recursive" else []
    update = ["git", "submodule", "update", "--init", *recursive]
    if (depth := job.variable("GIT_SUBMODULE_DEPTH") or "").isdigit() and int(depth) > 0:
        update += ["--depth", depth]
    update += _flags(job, "GIT_SUBMODULE_UPDATE_FLAGS", [])
    paths = _flags(job, "GIT_SUBMODULE_PATHS", [])
    note = "Updating/initializing submodules" + (" recursively..." if recursive else "...")
    out = [
        f"echo {_q(note)}",
        shlex.join(["git", "submodule", "init", *paths]) + " || exit 1",
        shlex.join(["git", "submodule", "sync", *recursive, *paths]) + " || exit 1",
        shlex.join([*update, *(["--", *paths] if paths else [])]) + " || exit 1",
    ]
    if clean:
        out.append(shlex.join(["git", "submodule", "foreach", *recursive,
                               shlex.join(["git", "clean", *clean, "-q"])]) + " || exit 1")
    return out


def _hook(job: JobPayload, name: str) -> list[str]:
    """The job's ``hooks:<name>`` lines, run by bash in the project directory (a failing
    line fails getting the source, as in gitlab-runner)."""
    lines = job.hook(name)
    if not lines:
        return []
    # Its own bash: `set -e` in a subshell tested by `||` would be ignored.
    return [f"echo {_q(f'Running {name}')}",
            f"bash -eo pipefail -c {_q(chr(10).join(lines))} || exit 1"]
