"""The real components some tests need: where one is missing, CI (``CI`` set) fails, elsewhere the
test is skipped."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def require_binary(name: str, hint: str) -> str:
    """Path of the executable ``name``; fails under CI and skips elsewhere when it is missing
    (``hint`` says how to get it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing ({hint})")
        pytest.skip(f"{name} not installed ({hint})")
    return path


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI runs as root with mount rights)")
    pytest.skip(what)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (e.g. ``"256k"``) mounted at ``path`` for a full-disk test;
    unmounted after. Needs root: fails under CI and skips elsewhere without it."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        _missing(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
