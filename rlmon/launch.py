"""``rlmon launch``: a collector beside a training command (usually ``torchrun``).

Starts the collector in its own session, waits until it has written ``collector.json`` (its ready
signal), runs the command with ``RLMON_ENDPOINT``/``RLMON_RUN_ID``/``RLMON_OUT`` in its
environment and in its own process group, forwards SIGINT/SIGTERM to that group, and when the
command ends asks the collector to write its final reports. Exits with the command's exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from rlmon.errors import CollectorUnavailable

#: Seconds to wait for the collector to become ready (a cold Numba cache compiles first).
READY_TIMEOUT = 120.0
#: Seconds to wait for the collector to write its reports after the command ended.
FINALIZE_TIMEOUT = 120.0


def start_collector(out_dir: Path, run_id: str, collector_flags: Sequence[str]) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m collector`` and wait for its ``collector.json``; return (process, info)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "collector.json"
    command = [sys.executable, "-m", "collector", *collector_flags, "--run-id", run_id,
               "--parent-pid", str(os.getpid()), "--quiet"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    info = wait_for_collector(info_path, process, READY_TIMEOUT)
    return process, info


def wait_for_collector(info_path: Path, process: subprocess.Popen, timeout: float) -> dict:
    """Poll for ``collector.json`` written by ``process``; raise if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CollectorUnavailable(f"the collector exited with code {process.returncode}")
        info = _read_json(info_path)
        if info.get("pid") == process.pid:
            return info
        time.sleep(0.05)  # polling a file written by another process; bounded by the deadline
    process.kill()
    raise CollectorUnavailable(f"the collector was not ready after {timeout:.0f} s")


def finalize_collector(process: subprocess.Popen, timeout: float = FINALIZE_TIMEOUT) -> int:
    """SIGTERM the collector (it drains, writes the reports, exits) and wait; kill past timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(5)


def run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` in its own process group, forwarding SIGINT/SIGTERM; return its exit code
    (128 + signal number when a signal ended it, as a shell reports it)."""
    child = subprocess.Popen(list(command), env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def launch(out_dir: Path, command: Sequence[str], collector_flags: Sequence[str],
           run_id: str = "") -> int:
    """The whole of ``rlmon launch``; returns the command's exit code."""
    run_id = run_id or uuid.uuid4().hex[:12]
    process, info = start_collector(out_dir, run_id, collector_flags)
    print(f"rlmon: collector ready at {info['endpoint']}; metrics at {info['metrics_url']}",
          file=sys.stderr, flush=True)
    env = dict(os.environ, RLMON_ENDPOINT=info["endpoint"], RLMON_RUN_ID=run_id,
               RLMON_OUT=str(out_dir))
    try:
        code = run_command(command, env)
    finally:
        finalize_collector(process)
    print(summary_line(out_dir, code), file=sys.stderr, flush=True)
    return code


def summary_line(out_dir: Path, code: int) -> str:
    """One line for the end of a launch: exit code, stop state, where the reports are."""
    report = _read_json(out_dir / "training_report.json")
    summary = report.get("summary", {})
    stopped = ""
    if summary.get("early_stopped"):
        stopped = f"; stopped early: {summary.get('stop_reason')}"
    return f"rlmon: command exited {code}{stopped}; reports in {out_dir}"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
