"""Every third-party module `runner/` imports is declared in pyproject.toml, and every
declared dependency is imported (or named here with the reason it is kept)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Distribution name -> the top-level module it provides, where they differ.
PROVIDES = {
    "PyGithub": "github", "python-gitlab": "gitlab", "PyJWT": "jwt",
    "pydantic-settings": "pydantic_settings", "prometheus-client": "prometheus_client",
    "qemu.qmp": "qemu",
}
KEPT = {
    "cryptography": "PyJWT's RS256 needs it at run time; nothing imports it by name",
}


def declared() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in deps]
    return {PROVIDES.get(n, n.replace("-", "_").lower()): n for n in names}


def imported() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "runner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "runner"}


def test_every_third_party_import_is_declared() -> None:
    assert sorted(imported() - set(declared())) == []


def test_every_declared_dependency_is_used() -> None:
    unused = {dist for module, dist in declared().items()
              if module not in imported() and dist not in KEPT}
    assert unused == set()
