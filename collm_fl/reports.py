"""Report files written whole or not at all: a temporary file beside the target, then a rename.

An interrupt, a full disk or a plotting error while a report is written leaves the previous
file (or none), never half of one; a reader never sees a file being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` by a rename of a complete temporary file."""
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """``fig.savefig(path)`` (format from the suffix) by a rename of a complete file."""
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")


def _umask() -> int:
    """The process's umask: Linux shows it; elsewhere it is read by setting it and putting it
    back (for an instant other threads' new files would get the temporary one)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shared_like_files(folder: Path) -> None:
    """Give ``folder`` the mode a new folder gets under the umask (``tempfile.mkdtemp`` makes it
    0700, which would make what is renamed from it private)."""
    os.chmod(folder, 0o777 & ~_umask())


@contextlib.contextmanager
def _replacing(path: Path):  # type: ignore[no-untyped-def]
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # (mkstemp's 0600 would make the report private)
        fd = os.open(tmp, os.O_RDONLY)  # its bytes on disk before its name: a power loss
        try:  # right after must not leave an empty report (a new name gets no help from the
            os.fsync(fd)  # filesystem)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable. POSIX only; a filesystem that
    refuses to fsync a folder has nothing to make durable there."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
