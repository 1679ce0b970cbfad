"""The embedded default: a single-process script with no collector configured starts its own.

The collector runs as a child process (never a thread in the training process: its Numba kernels,
plots and disk writes must not compete with training for the GIL). It binds an ``ipc://`` address
chosen here, so ``rlmon.init()`` returns at once: ZeroMQ queues the first batches until the
collector is up. ``finalize`` (called by ``Monitor.close``) asks it to write its reports and waits
a bounded time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlmon.config import RankConfig
from rlmon.errors import CollectorUnavailable
from rlmon.launch import finalize_collector, wait_for_collector

#: Seconds ``close()`` waits for the embedded collector to write its final reports.
FINALIZE_TIMEOUT = 60.0
#: Seconds ``close()`` waits for a collector that is still starting (compiling its kernels).
READY_TIMEOUT = 60.0


@dataclass(slots=True)
class EmbeddedCollector:
    """A collector child process owned by this training process."""

    process: subprocess.Popen
    endpoint: str
    out_dir: Path

    def wait_until_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait (bounded) until the collector has bound its socket, so the last batches and the
        goodbye are delivered rather than dropped at close. False if it never became ready (it
        exited, or was killed past ``timeout``)."""
        try:
            wait_for_collector(self.out_dir / "collector.json", self.process, timeout)
        except CollectorUnavailable:
            return False
        return True

    def finalize(self) -> None:
        """Ask the collector to finish (SIGTERM: it drains, writes reports, exits) and wait."""
        finalize_collector(self.process, FINALIZE_TIMEOUT)
        print(f"rlmon: reports in {self.out_dir}", file=sys.stderr)


def start_embedded_collector(config: RankConfig, extra_args: Sequence[str] = ()) -> EmbeddedCollector:
    """Spawn ``python -m collector`` for this process and return its endpoint at once.

    ``extra_args`` are further ``rlmon collector`` flags (``--kl-threshold 0.08``, say)."""
    out_dir = Path(config.out_dir or Path("rlmon_out") / config.run_id).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    socket_path = Path(tempfile.gettempdir()) / f"rlmon-{config.run_id}-{os.getpid()}.sock"
    endpoint = f"ipc://{socket_path}"
    command = [sys.executable, "-m", "collector", "--out", str(out_dir), "--endpoint", endpoint,
               "--run-id", config.run_id, "--world-size", "1", "--parent-pid", str(os.getpid()),
               "--quiet", *extra_args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    return EmbeddedCollector(process, endpoint, out_dir)
