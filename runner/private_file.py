"""Files only this service's user may read, replaced whole.

`write_private` is how every piece of state that may hold something private
(tokens, job records, session ids, caches of private projects) reaches disk:
a fresh temp file made 0600 beside the target, flushed to disk, renamed over
it. A reader sees the old file or the new one, never half of either; a crash
leaves at most a ``.*.tmp`` file, which is never read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes | str, *, parent_mode: int | None = None) -> None:
    """Replace ``path`` atomically with a 0600 file holding ``data`` (str as UTF-8).

    Missing parents are made; with ``parent_mode`` the parent directory is made (or
    set to) that mode too, e.g. 0o700 for a directory of tokens.
    """
    parent = path.parent
    if parent_mode is None:
        parent.mkdir(parents=True, exist_ok=True)
    else:
        parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
        parent.chmod(parent_mode)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
