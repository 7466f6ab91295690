"""Reading a file only if it is a regular file, and only up to a limit: a run's files for the live
page, the dataset, a trace, the trainer's own progress.jsonl.

A FIFO or a device put where a file is expected would block a reader for ever or act when opened,
and a link out of a run directory would serve what is not the run's; a huge file would take the
reader's memory. Every read of a file that someone else may have put in place goes through here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional

MAX_FILE_BYTES = 256 * 1024 * 1024  # the most a reader of a run's JSON files takes in (weights.json is ~1 MB)


def open_regular(path: Path, inside: Optional[Path] = None):
    """`path` opened for reading (binary) if it is a regular file; OSError otherwise. A FIFO or a
    device is refused without opening it (opening one can act: a writer let go, a tape rewound), or,
    put in place between the look and the open, without waiting on it (O_NONBLOCK, then looked at
    again); with `inside`, so is a file whose real path is not in that directory (a link out of a run)."""
    flags = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    if inside is not None:
        real, base = os.path.realpath(path), os.path.realpath(inside)
        try:
            outside = os.path.commonpath([real, base]) != base
        except ValueError:  # another drive
            outside = True
        if outside:
            raise OSError(errno.EACCES, "a link to outside the run directory")
        # the path the check saw, opened without following a link: one swapped in since is refused
        path, flags = real, flags | getattr(os, "O_NOFOLLOW", 0)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: Path, inside: Optional[Path] = None, limit: Optional[int] = None) -> bytes:
    """A regular file's bytes (open_regular), OSError if it holds more than `limit` (MAX_FILE_BYTES).
    read() is asked for what the file holds when opened and one byte more (to see its end), then for
    what it grew by since, never for `limit` bytes at once: PyPy allocates all that read() is asked
    for, and 256 MB made every small JSON file cost ~0.14 s."""
    limit = MAX_FILE_BYTES if limit is None else limit
    parts, total = [], 0
    with open_regular(path, inside) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:  # said by its size: never read (and allocated) up to the limit first
            raise OSError(errno.EFBIG, f"larger than the {limit:,} bytes this server reads")
        want = size + 1
        while want > 0:
            chunk = f.read(want)
            parts.append(chunk)
            total += len(chunk)
            if len(chunk) < want:  # its end: a regular file's read is short only there
                break
            want = min(1 << 20, limit + 1 - total)  # it grew since it was opened: a MB at a time
    if total > limit:
        raise OSError(errno.EFBIG, f"larger than the {limit:,} bytes this server reads")
    return b"".join(parts)
