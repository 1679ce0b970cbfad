"""``rlmon launch``: a collector beside a training command (usually ``torchrun``).

Starts the collector in its own session, waits until it has written ``collector.json`` (its ready
signal), runs the command with ``RLMON_ENDPOINT``/``RLMON_RUN_ID``/``RLMON_OUT`` in its
environment and in its own process group, forwards SIGINT/SIGTERM to that group, restarts the
collector if it dies meanwhile (:class:`CollectorKeeper`), and when the command ends asks the
collector to write its final reports. Exits with the command's exit code.

While the command runs, the live view of :mod:`rlmon.top` is shown (``--no-top`` turns it off).
When both stdout and stderr are terminals it is drawn at the bottom of the terminal and the
command's output (stdout and stderr, merged, colours kept, ``PYTHONUNBUFFERED=1`` so Python
prints are not held back) is relayed line by line above it; a line is shown once it ends, so a
``\r`` progress bar shows its final state only. Otherwise the command writes to the launcher's
stdout and stderr itself, exactly as without the view, and a plain status line goes to stderr
every few seconds, plus one line per alert.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

from rlmon.errors import CollectorUnavailable

#: Seconds to wait for the collector to become ready (a cold Numba cache compiles first).
READY_TIMEOUT = 120.0
#: Seconds to wait for the collector to write its reports after the command ended.
FINALIZE_TIMEOUT = 120.0


def start_collector(out_dir: Path, run_id: str, collector_flags: Sequence[str],
                    relay: Callable[[str], None] | None = None) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m collector`` and wait for its ``collector.json``; return (process, info).
    With ``relay``, the collector's output (its warnings, its children's) goes there instead,
    from a thread kept as the process's ``relay_thread`` attribute (else None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "collector.json"
    command = [sys.executable, "-m", "collector", *collector_flags, "--run-id", run_id,
               "--parent-pid", str(os.getpid()), "--quiet"]
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if relay else {}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, **pipe)
    process.relay_thread = _start_relay(process.stdout, relay) if relay else None
    try:
        info = wait_for_collector(info_path, process, READY_TIMEOUT)
    except CollectorUnavailable:
        join_relay(process, 2.0)  # its last words (why it exited) before the launcher's
        raise
    return process, info


def join_relay(process: subprocess.Popen, timeout: float) -> None:
    """Wait up to ``timeout`` s for the output relay of ``process`` (if any) to reach the end."""
    thread = getattr(process, "relay_thread", None)
    if thread is not None:
        thread.join(timeout)


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


def run_command(command: Sequence[str], env: dict[str, str],
                relay: Callable[[str], None] | None = None) -> int:
    """Run ``command`` in its own process group, forwarding SIGINT/SIGTERM; return its exit code
    (128 + signal number when a signal ended it, as a shell reports it). With ``relay``, the
    command's stdout and stderr (merged) go to ``relay`` in chunks of whole lines instead of the
    launcher's own streams."""
    reader = None
    if relay is None:
        child = subprocess.Popen(list(command), env=env, start_new_session=True)
    else:
        env = {**env, "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED", "1")}
        child = subprocess.Popen(list(command), env=env, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = _start_relay(child.stdout, relay)

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
    if reader is not None:
        reader.join(5.0)  # a grandchild may still hold the pipe open: do not wait for it
    return 128 - code if code < 0 else code


def relay_output(pipe, write: Callable[[str], None], chunk_bytes: int = 1 << 16) -> None:
    """Copy ``pipe`` to ``write`` until end of file, in chunks of whole lines (a last line
    without a newline is given one at the end). Runs on the relay thread."""
    pending = b""
    fd = pipe.fileno()
    try:
        while chunk := os.read(fd, chunk_bytes):
            pending += chunk
            end = pending.rfind(b"\n") + 1
            if end:
                write(pending[:end].decode("utf-8", "replace"))
                pending = pending[end:]
        if pending:
            write(pending.decode("utf-8", "replace") + "\n")
    finally:
        pipe.close()


def _start_relay(pipe, write: Callable[[str], None]) -> threading.Thread:
    thread = threading.Thread(target=relay_output, args=(pipe, write), name="rlmon-relay",
                              daemon=True)
    thread.start()
    return thread


def view_display():
    """Where the live view goes: drawn in place on stderr when stdout and stderr are both
    terminals, else plain lines on stderr (:func:`rlmon.top.make_display`); None without
    ``rich``."""
    try:
        from rlmon.top import make_display

        return make_display(sys.stderr, allow_live=sys.stdout.isatty())
    except ImportError:
        return None


def start_view(out_dir: Path, display, total_steps: int | None = None):
    """The view of the run (:class:`rlmon.top.TopThread`, started) on ``display``."""
    from rlmon.top import TopOptions, TopThread

    return TopThread(out_dir, display, TopOptions(total_steps=total_steps)).start()


#: Restarts of a dying collector within one launch before the launcher gives up on it.
MAX_COLLECTOR_RESTARTS = 10


class CollectorKeeper:
    """Restarts the collector when it dies while the command runs: on the same run directory
    (it rebuilds its state from the event log), the same ZeroMQ address (the ranks keep their
    ``RLMON_ENDPOINT`` and re-send what was not acknowledged) and the same metrics port. At most
    :data:`MAX_COLLECTOR_RESTARTS` times, a second apart at least."""

    def __init__(self, out_dir: Path, run_id: str, flags: Sequence[str], process: subprocess.Popen,
                 info: dict, relay: Callable[[str], None] | None) -> None:
        self.out_dir, self.run_id, self.relay = out_dir, run_id, relay
        port = info.get("metrics_url", "").rsplit(":", 1)[-1].split("/")[0]
        self.flags = [*flags, "--endpoint", info["endpoint"],
                      *(["--metrics-port", port] if port.isdigit() else [])]
        self.process = process
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rlmon-keeper", daemon=True)

    def start(self) -> CollectorKeeper:
        """Start watching."""
        self._thread.start()
        return self

    def stop(self) -> subprocess.Popen:
        """Stop watching; return the collector process now running (to finalize it)."""
        self._stopping.set()
        self._thread.join(READY_TIMEOUT + 5)
        return self.process

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self.process.wait(0.2)
            except subprocess.TimeoutExpired:
                continue
            if (self._stopping.is_set() or self.restarts >= MAX_COLLECTOR_RESTARTS
                    or self.process.returncode == 0):  # 0: stopped on purpose (SIGTERM), reports written
                return
            self._restart()

    def _restart(self) -> None:
        code = self.process.returncode
        self.restarts += 1
        self._say(f"rlmon: the collector exited ({code}); restarting it on {self.out_dir} "
                  f"({self.restarts}/{MAX_COLLECTOR_RESTARTS})")
        self._stopping.wait(1.0)  # no restart storm: a second between attempts
        try:
            self.process, _ = start_collector(self.out_dir, self.run_id, self.flags, self.relay)
        except CollectorUnavailable as exc:
            self._say(f"rlmon: the collector could not be restarted: {exc}")

    def _say(self, line: str) -> None:
        if self.relay is not None:
            self.relay(line + "\n")
        else:
            print(line, file=sys.stderr, flush=True)


def launch(out_dir: Path, command: Sequence[str], collector_flags: Sequence[str],
           run_id: str = "", top: bool = True, total_steps: int | None = None) -> int:
    """The whole of ``rlmon launch``; returns the command's exit code. ``top``: show the live
    view (see the module docstring); ``total_steps``: its progress bar's total."""
    run_id = run_id or uuid.uuid4().hex[:12]
    display = view_display() if top else None
    relay = display.output if display is not None and display.terminal else None
    process, info = start_collector(out_dir, run_id, collector_flags, relay)
    print(f"rlmon: collector ready at {info['endpoint']}; metrics at {info['metrics_url']}",
          file=sys.stderr, flush=True)
    env = dict(os.environ, RLMON_ENDPOINT=info["endpoint"], RLMON_RUN_ID=run_id,
               RLMON_OUT=str(out_dir), **curve_env(info))
    view = start_view(out_dir, display, total_steps) if display is not None else None
    keeper = CollectorKeeper(out_dir, run_id, collector_flags, process, info, relay).start()
    try:
        code = run_command(command, env, relay)
    finally:
        if view is not None:
            view.stop()
        process = keeper.stop()
        finalize_collector(process)
        join_relay(process, 2.0)
    print(summary_line(out_dir, code), file=sys.stderr, flush=True)
    return code


def curve_env(info: dict) -> dict[str, str]:
    """For a CURVE collector: the server's public key and, unless set already, the first client
    secret key of its key directory, for the command's ranks (one node; other nodes set their own)."""
    server_key = info.get("curve_server_key")
    if not server_key:
        return {}
    env = {"RLMON_CURVE_SERVER_KEY": server_key}
    if not os.environ.get("RLMON_CURVE_CLIENT_SECRET"):
        secrets = sorted((Path(server_key).parent / "clients").glob("*.key_secret"))
        if secrets:
            env["RLMON_CURVE_CLIENT_SECRET"] = str(secrets[0])
    return env


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
