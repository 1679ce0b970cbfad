"""Write a file so that readers see either the old contents or the new, never half of either.

The data goes to a temporary file in the target's own directory (so the rename cannot cross a
filesystem), is flushed and fsynced, and is then moved over the target with :func:`os.replace`,
which is atomic on POSIX and on Windows. The directory is fsynced afterwards where the platform
allows it, so the rename itself survives a power cut. This is what prometheus_client's
``write_to_textfile`` does, plus the fsyncs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_DEFAULT_MODE = 0o644


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` whole with ``data``; return the path written.

    The parent directory must exist. A file already at ``path`` keeps its permission bits; a new
    one gets ``0o644``. On any failure the temporary file is removed, the previous file (if any) is
    left untouched, and the exception propagates. Safe to call from any thread; two concurrent
    writers to the same path each write whole files and the last rename wins.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(tmp_name, _mode_for(target))
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` whole with ``text`` encoded as ``encoding``.

    See :func:`atomic_write_bytes` for permissions and failure behaviour.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def _mode_for(target: Path) -> int:
    """Permission bits for the new file: the existing file's, else ``0o644``."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return _DEFAULT_MODE


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
