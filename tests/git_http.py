"""A git repository served over HTTP as GitLab serves one: ``git http-backend`` behind
a small aiohttp CGI wrapper that demands a job token as HTTP basic auth."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fake_gitlab import make_job

GIT = "/usr/bin/git"
PROJECT = "group/project"


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` with no user or system config; its stdout, stripped."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    return subprocess.run([GIT, *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@dataclass
class GitServer:
    url: str
    """What jobs name as GitLab's URL (``http://host:port``)."""
    root: Path
    """The directory of bare repositories (``group/project.git`` in it)."""
    tokens: set[str]
    """Job tokens the server accepts."""
    shas: list[str]
    """The repository's commits, oldest first."""
    auth_failures: int = 0

    def pipeline_ref(self, job_id: int, sha: str) -> None:
        """GitLab keeps ``refs/pipelines/<id>`` for every pipeline; jobs' refspecs fetch it
        (``tests.fake_gitlab.make_job`` names pipeline 9000 + job id)."""
        git(self.root / f"{PROJECT}.git", "update-ref", f"refs/pipelines/{9000 + job_id}", sha)

    def job(self, job_id: int, **kw: Any) -> dict[str, Any]:
        """A job payload (``tests.fake_gitlab.make_job``) whose checkout this server serves:
        its pipeline ref exists and its token is accepted; by default a depth-1 fetch of the
        second commit."""
        kw.setdefault("sha", self.shas[1])
        kw.setdefault("depth", 1)
        payload = make_job(job_id, server_url=self.url, **kw)
        self.pipeline_ref(job_id, kw["sha"])
        self.tokens.add(payload["token"])
        return payload


async def _cgi(server: GitServer, request: web.Request) -> web.StreamResponse:
    auth = request.headers.get("Authorization", "")
    user_pass = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ""
    user, _, password = user_pass.partition(":")
    if user != "gitlab-ci-token" or password not in server.tokens:
        server.auth_failures += 1
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="GitLab"'})
    env = {
        "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": request.path, "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.query_string, "CONTENT_TYPE": request.content_type,
        "REMOTE_USER": user, "REMOTE_ADDR": "127.0.0.1", "GATEWAY_INTERFACE": "CGI/1.1",
        "HTTP_CONTENT_ENCODING": request.headers.get("Content-Encoding", ""),
        "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        "PATH": os.environ["PATH"], "HOME": str(server.root),
    }
    body = await request.read()
    env["CONTENT_LENGTH"] = str(len(body))
    proc = await asyncio.create_subprocess_exec(
        GIT, "http-backend", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = await proc.communicate(body)
    head, _, payload = out.partition(b"\r\n\r\n")
    status, headers = 200, {}
    for line in head.decode().split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.split()[0])
        elif key:
            headers[key] = value.strip()
    return web.Response(status=status, body=payload, headers=headers)


@contextlib.asynccontextmanager
async def serve_repo(
    base: Path, commits: Sequence[Mapping[str, str]], *, bind: str = "127.0.0.1",
    advertise: str = "127.0.0.1",
) -> AsyncIterator[GitServer]:
    """``group/project.git`` with one commit per mapping (path → text, on top of the
    previous one), served on ``bind``; jobs reach it at ``advertise``."""
    src = base / "src"
    src.mkdir()
    git(src, "init", "-q", "-b", "main")
    shas = []
    for n, files in enumerate(commits):
        for name, text in files.items():
            (src / name).write_text(text)
        git(src, "add", "-A")
        git(src, "commit", "-q", "-m", f"commit {n + 1}")
        shas.append(git(src, "rev-parse", "HEAD"))
    root = base / "repos"
    (root / PROJECT).parent.mkdir(parents=True)
    git(base, "clone", "-q", "--bare", str(src), str(root / f"{PROJECT}.git"))
    server = GitServer("", root, set(), shas)
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _cgi(server, request)

    app.router.add_route("*", "/{path:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind((bind, 0))
        port = int(probe.getsockname()[1])
    await web.TCPSite(runner, bind, port).start()
    server.url = f"http://{advertise}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()
