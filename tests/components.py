"""The real components some tests need: where one is missing, CI (``CI`` set) fails, elsewhere the
test is skipped."""

from __future__ import annotations

import os
import shutil

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
