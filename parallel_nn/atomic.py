"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader (or a crash) sees either the old file or the new one, never half of one. If the disk is
full the old file is left untouched and the error names the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from parallel_nn import UserError, faults


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a result file should read like any other
        faults.point(f"write {path.name} before rename")
        replace(tmp, path)
    except BaseException as e:  # a full disk, or a second Ctrl-C mid-write: never leave the temporary file
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e} (the previous version, if any, is unchanged)") from e
        raise
    faults.point(f"write {path.name} after rename")


def replace(tmp: str, path: Path, tries: int = 50) -> None:
    """os.replace, retried for a while where Windows refuses it because a reader holds `path` open
    (access denied or a sharing violation: the live page and `evaluate` read these files while a
    run writes them). Any other error, and every error elsewhere, is raised at once."""
    for attempt in range(tries):
        try:
            os.replace(tmp, path)
            return
        except PermissionError as e:
            if getattr(e, "winerror", None) not in (5, 32) or attempt == tries - 1:  # only Windows' errors carry it
                raise
            time.sleep(0.02 * (attempt + 1))  # up to ~25 s in all


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    # json writes floats with repr(), which reads back bit-for-bit.
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())
