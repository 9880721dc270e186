"""A GitLab job as one bash script for the guest, and its result read back. No I/O.

`build_script` turns a `JobPayload` into the script the agent runs once in the
job's VM. In order, it: merges stderr into stdout (a GitLab trace is one
stream); exports the job's variables (file variables become files, the
variable holding the path; non-raw values expand ``$OTHER``); fetches the
source (`runner.forge.gitlab.checkout`: the job token reaches git through a
credential helper reading the environment, never argv or ``.git/config``);
extracts dependency and cache archives the host put in the guest
(`runner.forge.gitlab.layout.guest_parts`); runs the steps in order under
their ``when``, each in its own process group with stdin closed. The script
keeps the job's timeout itself, counted from its start: everything before
``after_script`` runs under the job's time left (or a step's own limit if
shorter) and, once it is spent, the job fails as gitlab-runner fails it
("execution took longer than ..."); ``after_script`` then still runs, with
``CI_JOB_STATUS`` and its own limit (`after_script_timeout`), its failure
never the job's; zips the caches to push into `GuestLayout.cache_path` and
archives the artifacts whose ``when`` applies, in their ``artifact_format``,
into `GuestLayout.artifact_path`; and writes one result line on the original
stderr (fd 3), which `runner.forge.gitlab.result` reads on the host.

SIGTERM to the script (the agent's cancel, or its deadline,
`runner.forge.gitlab.timeouts.host_deadline_s`, which only a hung script
reaches) stops the running step's group and ends with ``status=canceled``.
The script text holds the job's secrets: hand it only to the agent (which
writes it 0600 and deletes it).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner.forge.gitlab.checkout import get_sources
from runner.forge.gitlab.layout import GuestLayout
from runner.forge.gitlab.payload import Artifact, Cache, JobPayload, When
from runner.forge.gitlab.timeouts import after_script_timeout, go_duration, timeout_variable

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR_REF = re.compile(r"\$(\$|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")


def pulls(cache: Cache) -> bool:
    """Whether the job restores ``cache`` before its steps (GitLab's default: pull-push)."""
    return cache.policy in ("", "pull", "pull-push")


def pushes(cache: Cache) -> bool:
    """Whether the job saves ``cache`` after its steps."""
    return cache.policy in ("", "push", "pull-push")


def unsupported_reason(job: JobPayload) -> str | None:
    """Why this VM runner cannot run ``job`` as asked, or ``None``.

    A job that names an ``image`` or ``services`` expects containers; running
    its script on the VM's own OS would silently change what it tests. The
    caller fails it with ``configuration_error`` (GitLab shows it as
    ``script_failure``): the job's configuration must change, and retrying
    on this runner, which ``runner_system_failure`` would invite, cannot help.
    """
    if job.run.strip():
        return ("this job uses GitLab Steps (the `run` keyword), which need step-runner;"
                " this runner runs `script` jobs only: use `script`, or a runner with"
                " step-runner support")
    wanted = []
    if job.image is not None:
        wanted.append(f"image {job.image.name!r}")
    if job.services:
        wanted.append("services " + ", ".join(repr(s.name) for s in job.services))
    if not wanted:
        return None
    return (f"this runner runs jobs in microVMs and cannot honour {' and '.join(wanted)}:"
            " remove them from the job or use a runner with a container executor")


def expand(variables: Sequence[tuple[str, str, bool]], paths: Mapping[str, str],
           defined: Mapping[str, str] | None = None) -> list[str]:
    """Values with ``$NAME``/``${NAME}`` resolved against the job's variables.

    ``variables`` is ``(key, value, raw)``; raw values stay as they are. A
    reference to a file variable gives its path (``paths``), one to a variable
    the runner defines (``defined``, such as ``CI_PROJECT_DIR``) its value, an
    unknown name nothing, and ``$$`` a literal ``$``, as gitlab-runner expands them.
    """
    table = {key: paths.get(key, value) for key, value, _raw in variables}
    table.update(defined or {})

    def one(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}")
        return "$" if name == "$" else table.get(name, "")

    return [value if raw else _VAR_REF.sub(one, value) for _key, value, raw in variables]


def _q(value: str) -> str:
    return shlex.quote(value)


_SF_LEFT = "$((__sf_deadline - SECONDS > 1 ? __sf_deadline - SECONDS : 1))"
"""The job's time left in whole seconds, at least 1 (for ``timeout``), without a fork."""

_PRELUDE = r"""
exec 3>&2 2>&1 </dev/null
set -u
umask 0022
__sf_status=success __sf_exit=0 __sf_step=- __sf_timed_out=0 __sf_failed=0 __sf_child=
__sf_expired=0 __sf_left=0
__sf_artifacts= __sf_caches=
# printf's own %(%s)T, not $(date +%s): a fork per section is slow in an emulated guest.
__sf_section_start() {
  printf 'section_start:%(%s)T:%s\r\033[0K\033[36;1m%s\033[0;m\n' -1 "$1" "$2"
}
__sf_section_end() { printf 'section_end:%(%s)T:%s\r\033[0K' -1 "$1"; }
__sf_note() { printf '\033[0;33m%s\033[0;m\n' "$1"; }
__sf_error() { printf '\033[31;1m%s\033[0;m\n' "$1"; }
__sf_result() {
  printf 'snapfleet-gitlab-result status=%s exit_code=%s step=%s timed_out=%s %s %s\n' \
    "$__sf_status" "$__sf_exit" "$__sf_step" "$__sf_timed_out" \
    "artifacts=${__sf_artifacts:--}" "caches=${__sf_caches:--}" >&3
}
__sf_cancel() {
  trap - TERM INT
  # $! too: a signal can land between `( ... ) &` and `__sf_child=$!`, and the trap then
  # runs with __sf_child still empty while the step is already starting.
  local child=${__sf_child:-$!}
  if [ -n "$child" ]; then
    # The step's group is timeout's (its pid): TERM to timeout and to the group, then,
    # once timeout has gone, KILL whatever of the group is left (a process caught
    # between fork and exec can miss the TERM and would outlive the job).
    kill -TERM -- "-$child" "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    kill -KILL -- "-$child" 2>/dev/null
  fi
  echo
  __sf_error "ERROR: Job was canceled"
  __sf_status=canceled __sf_exit=143
  __sf_result
  exit 143
}
trap __sf_cancel TERM INT
# Run a step file in its own process group (timeout makes one) under a time limit (0: none).
__sf_run() {  # limit file dir -> sets __sf_rc, __sf_step_timed_out
  local started=$SECONDS
  __sf_step_timed_out=0
  ( cd "$3" && exec timeout -k 10 "$1" bash --noprofile --norc "$2" ) 3>&- &
  __sf_child=$!
  wait "$__sf_child"
  __sf_rc=$?
  __sf_child=
  if [ "$1" != 0 ] && { [ "$__sf_rc" = 124 ] || [ "$__sf_rc" = 137 ]; } \
     && [ $((SECONDS - started)) -ge "$1" ]; then
    __sf_step_timed_out=1
  fi
}
# The job's own timeout, counted from the script's start: what is left of it (__sf_left), or
# false once it is spent, the job then failed as gitlab-runner fails it.
__sf_in_time() {  # [step] -> sets __sf_left
  __sf_left=$((__sf_deadline - SECONDS))
  [ "$__sf_left" -gt 0 ] && return 0
  __sf_expire 1 "${1:--}"
  return 1
}
__sf_expire() {  # exit-code step
  [ "$__sf_expired" = 0 ] || return 0
  __sf_expired=1
  __sf_error "ERROR: Job failed: execution took longer than $__sf_timeout_text seconds"
  __sf_status=failed __sf_failed=1 __sf_timed_out=1 __sf_exit=$1 __sf_step=$2
}
# A step before after_script: under its own timeout (0: none) or the job's time left if less.
__sf_main() {  # step own-timeout file dir -> sets __sf_rc, __sf_step_timed_out
  if ! __sf_in_time "$1"; then __sf_rc=1 __sf_step_timed_out=1; return; fi
  local limit=$2
  if [ "$limit" = 0 ] || [ "$limit" -gt "$__sf_left" ]; then limit=$__sf_left; fi
  __sf_run "$limit" "$3" "$4"
  if [ "$__sf_step_timed_out" = 1 ] && [ "$SECONDS" -ge "$__sf_deadline" ]; then
    __sf_expire "$__sf_rc" "$1"
  fi
}
"""


def build_script(job: JobPayload, layout: GuestLayout | None = None) -> str:
    """The bash script that runs ``job`` in the guest; see the module docstring."""
    layout = layout or GuestLayout()
    work = layout.work_dir
    project = layout.project_dir(job)
    out = [f"#!/bin/bash\n# Snapfleet: GitLab job {job.id}", _PRELUDE]
    out.append(f"__sf_work={_q(work)}")
    out.append(f"__sf_deadline=$((SECONDS + {job.timeout_s})) "
               f"__sf_timeout_text={_q(go_duration(job.timeout_s))}")
    out.append('__sf_section_start prepare_script "Preparing environment"')
    # deps/ and cache-in/ are the host's: it put archives there before the script.
    # (A fork and exec costs ~40 ms in an emulated guest: no `rm` in a fresh VM.)
    out.append('[ ! -e "$__sf_work/steps" ] || rm -rf "$__sf_work/vars" "$__sf_work/steps" '
               '"$__sf_work/artifacts" "$__sf_work/caches"')
    out.append('mkdir -p -m 0700 "$__sf_work" "$__sf_work/vars" "$__sf_work/steps" '
               '"$__sf_work/artifacts" "$__sf_work/caches" "$__sf_work/deps" '
               '"$__sf_work/cache-in"')
    out += _variables(job, layout, project)
    out += get_sources(job)
    out += _restore_caches(job, layout)
    out += _dependencies(job, layout)
    out += _steps(job)
    if job.artifacts or any(pushes(c) for c in job.cache):
        collector = Path(__file__).with_name("_collect.py").read_text(encoding="utf-8")
        out.append(f'printf \'%s\' {_q(collector)} > "$__sf_work/collect.py"')
    out += _archive_caches(job, layout)
    out += _artifacts(job, layout)
    out.append('__sf_result\nexit "$__sf_exit"\n')
    return "\n".join(out)


def runner_variables(layout: GuestLayout, project: str) -> dict[str, str]:
    """The variables the runner defines, not GitLab (a job's own cannot override them)."""
    return {"CI_BUILDS_DIR": layout.builds_dir, "CI_PROJECT_DIR": project}


def _variables(job: JobPayload, layout: GuestLayout, project: str) -> list[str]:
    out = ['echo "Running on $HOSTNAME via snapfleet..."']
    defined = runner_variables(layout, project)
    out.append("export " + " ".join(f"{k}={_q(v)}" for k, v in defined.items()))
    usable = []
    for var in job.variables:
        if var.key in defined:
            continue
        if _NAME.match(var.key):
            usable.append(var)
        else:
            out.append(f"__sf_note {_q(f'WARNING: variable {var.key!r} is not a shell name')}")
    paths = {v.key: f"{layout.work_dir}/vars/{v.key}" for v in usable if v.file}
    values = expand([(v.key, v.value, v.raw) for v in usable], paths, defined)
    for var, value in zip(usable, values, strict=True):
        if var.file:
            path = paths[var.key]
            out.append(f"printf '%s' {_q(value)} > {_q(path)} && chmod 0600 {_q(path)}")
            out.append(f"export {var.key}={_q(path)}")
        else:
            out.append(f"export {var.key}={_q(value)}")
    out.append('__sf_section_end prepare_script')
    return out


def _dependencies(job: JobPayload, layout: GuestLayout) -> list[str]:
    deps = [d for d in job.dependencies if d.artifacts_file and d.artifacts_file.filename]
    if not deps:
        return []
    out = ['if [ "$__sf_failed" = 0 ] && __sf_in_time download_artifacts; then',
           '__sf_section_start download_artifacts "Downloading artifacts"']
    for dep in deps:
        parts = f"{layout.dependency_dir()}/{dep.id}.zip"
        out += [
            f"if ls {_q(parts)}.part* >/dev/null 2>&1; then",
            f"  cat {_q(parts)}.part* > {_q(parts)} && "
            f'timeout -k 5 "{_SF_LEFT}" '
            f'python3 -m zipfile -e {_q(parts)} "$CI_PROJECT_DIR" && '
            f"echo {_q(f'Extracted artifacts of {dep.name} ({dep.id})')}"
            f" || {{ __sf_in_time download_artifacts && "
            f"{{ __sf_error {_q(f'ERROR: artifacts of {dep.name} are not a zip')}; "
            "__sf_status=failed __sf_failed=1 __sf_exit=1 __sf_step=download_artifacts; }; }",
            f"else __sf_note {_q(f'WARNING: no artifacts of {dep.name} ({dep.id}) arrived')}; fi",
        ]
    out += ['__sf_section_end download_artifacts', "fi"]
    return out


_WHEN = {When.ON_SUCCESS: '[ "$__sf_failed" = 0 ]', When.ON_FAILURE: '[ "$__sf_failed" = 1 ]',
         When.ALWAYS: "true"}
"""The shell test for each ``when``, given how the job has gone so far."""


def _step_file(lines: Sequence[str]) -> str:
    """One step as a bash program: echo each command as GitLab does, stop at a failure."""
    body = ["set -eo pipefail", "set +o noclobber"]
    for line in lines:
        shown = line.splitlines()[0] if line.strip() else line
        if "\n" in line.strip():
            shown += " # collapsed multi-line command"
        body.append(f"printf '\\033[32;1m$ %s\\033[0;m\\n' {_q(shown)}")
        body.append(line)
    return "\n".join(body) + "\n"


def _steps(job: JobPayload) -> list[str]:
    out = []
    after_limit = after_script_timeout(job)
    script_limit = timeout_variable(job, "RUNNER_SCRIPT_TIMEOUT")[0]
    for name in ("RUNNER_SCRIPT_TIMEOUT", "RUNNER_AFTER_SCRIPT_TIMEOUT"):
        if (warning := timeout_variable(job, name)[1]) is not None:
            out.append(f"__sf_note {_q(warning)}")
    for n, step in enumerate(job.steps):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", step.name)
        path = f'"$__sf_work/steps/{n}.sh"'
        after = step.name == "after_script"
        out.append(f"printf '%s' {_q(_step_file(step.script))} > {path}")
        header = ('Running after_script' if after
                  else f'Executing "step_{name}" stage of the job script')
        if after:
            # Also after the job's time ran out, under its own limit (gitlab-runner's).
            limit = after_limit
            out += [
                f"if {_WHEN[step.when]}; then",
                '  if [ "$__sf_failed" = 0 ]; then export CI_JOB_STATUS=success; '
                "else export CI_JOB_STATUS=failed; fi",
                f"  __sf_section_start step_{name} {_q(header)}",
                f'  __sf_run {limit} {path} "$CI_PROJECT_DIR"',
            ]
        else:
            # GitLab sets a step's timeout to the job's: the job's time left decides.
            limit = min((t for t in (step.timeout, script_limit) if t), default=0)
            out += [
                f'if {_WHEN[step.when]} && [ "$__sf_expired" = 0 ]; then',
                f"  __sf_section_start step_{name} {_q(header)}",
                f'  __sf_main {_q(name)} {limit} {path} "$CI_PROJECT_DIR"',
            ]
        out.append(f"  __sf_section_end step_{name}")
        timeout_msg = f"ERROR: step {step.name} exceeded its timeout of {limit} s"
        out.append('  if [ "$__sf_step_timed_out" = 1 ] && [ "$__sf_expired" = 0 ]; then '
                   f"__sf_error {_q(timeout_msg)}; fi")
        if after:
            out.append('  if [ "$__sf_rc" != 0 ]; then '
                       '__sf_note "WARNING: after_script failed, but the job continues"; fi')
        elif step.allow_failure:
            allowed = f"WARNING: step {step.name} failed (allowed)"
            out.append(f'  if [ "$__sf_rc" != 0 ] && [ "$__sf_expired" = 0 ]; then '
                       f"__sf_note {_q(allowed)}; fi")
        else:
            out += [
                '  if [ "$__sf_rc" != 0 ] && [ "$__sf_failed" = 0 ]; then',
                '    __sf_status=failed __sf_failed=1 __sf_exit=$__sf_rc '
                f"__sf_step={_q(name)} __sf_timed_out=$__sf_step_timed_out",
                '    __sf_error "ERROR: Job failed: exit code $__sf_rc"',
                "  fi",
            ]
        out.append("fi")
    return out


def _restore_caches(job: JobPayload, layout: GuestLayout) -> list[str]:
    restores = [(n, c) for n, c in enumerate(job.cache) if pulls(c)]
    if not restores:
        return []
    out = ['if [ "$__sf_failed" = 0 ] && __sf_in_time restore_cache; then',
           '__sf_section_start restore_cache "Restoring cache"']
    for n, cache in restores:
        parts = f"{layout.cache_in_dir()}/{n}.zip"
        key = cache_key(cache)
        out += [
            f"echo {_q(f'Checking cache for {key}...')}",
            f"if ls {_q(parts)}.part* >/dev/null 2>&1; then",
            f"  cat {_q(parts)}.part* > {_q(parts)} && "
            f'timeout -k 5 "{_SF_LEFT}" '
            f'python3 -m zipfile -e {_q(parts)} "$CI_PROJECT_DIR" && '
            f"echo {_q(f'Successfully extracted cache {key}')}"
            f" || __sf_note {_q(f'WARNING: the cache {key} could not be extracted')}",
            f"else __sf_note {_q(f'WARNING: no cache for {key} yet')}; fi",
        ]
    out += ['__sf_section_end restore_cache', "fi"]
    return out


def _archive_caches(job: JobPayload, layout: GuestLayout) -> list[str]:
    out = []
    for n, cache in enumerate(job.cache):
        if not pushes(cache):
            continue
        key = cache_key(cache)
        spec = json.dumps({"paths": cache.paths, "exclude": [], "untracked": cache.untracked,
                           "for": "cache"})
        label = "on_failure" if cache.when is When.ON_FAILURE else "on_success"
        out += [
            f"if {_WHEN[cache.when]}; then",
            f"  __sf_section_start archive_cache_{label} {_q(f'Saving cache for {key}')}",
            f'  ( cd "$CI_PROJECT_DIR" && python3 "$__sf_work/collect.py" "$CI_PROJECT_DIR" '
            f"{_q(layout.cache_path(n))} {_q(spec)} ) 3>&- "
            f'&& __sf_caches="${{__sf_caches:+$__sf_caches,}}{n}"',
            f"  __sf_section_end archive_cache_{label}",
            "fi",
        ]
    return out


def cache_key(cache: Cache) -> str:
    """The key a cache is kept under (GitLab's ``default`` when the job names none)."""
    return cache.key or "default"


def _artifacts(job: JobPayload, layout: GuestLayout) -> list[str]:
    out = []
    for n, artifact in enumerate(job.artifacts):
        out += _artifact(n, artifact, layout)
    return out


def _artifact(n: int, artifact: Artifact, layout: GuestLayout) -> list[str]:
    kind = artifact.artifact_type or "archive"
    spec = json.dumps({"paths": artifact.paths, "exclude": artifact.exclude,
                       "untracked": artifact.untracked,
                       "format": artifact.artifact_format or "zip"})
    cond = _WHEN[artifact.when]
    label = "on_failure" if artifact.when is When.ON_FAILURE else "on_success"
    # Exit 3 is "nothing matched" (a warning, as gitlab-runner has it); any other
    # failure to build the archive fails the job, as gitlab-runner's uploader does.
    return [
        f"if {cond}; then",
        f"  __sf_section_start upload_artifacts_{label} "
        f"{_q(f'Uploading artifacts as {kind!r}')}",
        f'  ( cd "$CI_PROJECT_DIR" && python3 "$__sf_work/collect.py" "$CI_PROJECT_DIR" '
        f"{_q(layout.artifact_path(n))} {_q(spec)} ) 3>&-",
        "  __sf_rc=$?",
        '  if [ "$__sf_rc" = 0 ]; then __sf_artifacts="${__sf_artifacts:+$__sf_artifacts,}'
        f'{n}"',
        '  elif [ "$__sf_rc" != 3 ] && [ "$__sf_failed" = 0 ]; then',
        f"    __sf_status=failed __sf_failed=1 __sf_exit=1 __sf_step=upload_artifacts_{label}",
        f"    __sf_error {_q(f'ERROR: Job failed: the artifacts {kind!r} could not be archived')}",
        "  fi",
        f"  __sf_section_end upload_artifacts_{label}",
        "fi",
    ]
