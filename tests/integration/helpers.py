"""Helpers for integration tests: real collector processes, polling with deadlines, scraping."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from tests.components import require_binary

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
TOY_TRAINER = Path(__file__).resolve().parent / "toy_train.py"


def wait_for(condition: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail the test past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # the poll interval of a deadline-bounded wait, not a fixed wait


def read_json(path: Path) -> dict:
    """A JSON file's content, or {} while it does not exist (or is being replaced)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def scrape(url: str) -> str:
    """GET a /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    return None


def rlmon_command() -> list[str]:
    """How to run the ``rlmon`` CLI with this interpreter."""
    return [sys.executable, "-m", "rlmon.cli"]


def torchrun_command(nproc: int = 2) -> list[str]:
    """torchrun with free rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def free_port() -> int:
    """A free loopback TCP port."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this repo importable, no inherited rlmon settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLMON_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@contextlib.contextmanager
def running_collector(out_dir: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, dict]]:
    """A real ``python -m collector`` process; yields (process, collector.json). Always stopped."""
    process = subprocess.Popen([sys.executable, "-m", "collector", "--out", str(out_dir), "--quiet",
                                *flags], env=child_env(), stdin=subprocess.DEVNULL)
    try:
        info = wait_for(lambda: _ready(out_dir, process), 120, "the collector's collector.json")
        yield process, info
    finally:
        stop_process(process)


def _ready(out_dir: Path, process: subprocess.Popen) -> dict | None:
    if process.poll() is not None:
        pytest.fail(f"collector exited early with {process.returncode}")
    info = read_json(out_dir / "collector.json")
    return info if info.get("pid") == process.pid else None


def stop_process(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM, wait, then SIGKILL: never leaves a process behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def promtool() -> str:
    """Path of promtool; fails in CI when it is missing, skips elsewhere."""
    return require_binary("promtool", "scripts/setup.sh installs Debian's prometheus package")


def scrape_until(url: str, predicate: Callable[[str], bool], timeout: float = 30.0,
                 what: str = "a condition on /metrics") -> str:
    """Scrape ``url`` until ``predicate(text)`` holds; return that text."""
    def attempt() -> str | None:
        text = scrape(url)
        return text if predicate(text) else None
    return wait_for(attempt, timeout, what)
