"""A real Prometheus for integration tests: temp config and TSDB, a loopback port, its HTTP API.

:func:`running_prometheus` starts the ``prometheus`` binary (Debian's 2.42 package here) scraping
the given targets every second, with rlmon's alert rules loaded, waits for ``/-/ready`` and always
stops it. :class:`PrometheusServer` queries it through ``/api/v1``. Missing binaries fail the test
in CI (``CI`` set) and skip it elsewhere, like :func:`tests.integration.helpers.promtool`.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from tests.components import require_binary
from tests.integration.helpers import REPO, free_port, stop_process, wait_for

RULES_DIR = REPO / "exporters" / "prometheus_rules"
ALERT_RULES = RULES_DIR / "rlmon_alerts.yml"
DASHBOARD = REPO / "exporters" / "grafana" / "rlmon_dashboard.json"
SCRAPE_INTERVAL_S = 1
"""Scrape and rule-evaluation interval of the test server, in seconds."""


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary; fails in CI when it is missing, skips elsewhere."""
    return require_binary("prometheus", "scripts/setup.sh installs Debian's prometheus package")


class PrometheusAPIError(AssertionError):
    """The Prometheus HTTP API answered with an error; ``error`` is its message."""

    def __init__(self, path: str, error: str) -> None:
        super().__init__(f"{path}: {error}")
        self.error = error


@dataclass(frozen=True, slots=True)
class PrometheusServer:
    """A running Prometheus: ``url`` is its base URL, ``log_path`` its combined output."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises :class:`PrometheusAPIError`."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusAPIError(path, f"HTTP {exc.code}") from exc
        if body.get("status") != "success":
            raise PrometheusAPIError(path, f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` now (``[]`` when empty)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """The range matrix of ``expr`` between Unix times ``start`` and ``end``."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str) -> float | None:
        """The value of the single sample ``expr`` returns now; None when it returns none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, expected: float, timeout: float = 30.0) -> float:
        """Poll until ``expr`` has the single value ``expected`` (NaN matches NaN)."""
        def matches() -> bool:
            value = self.value(expr)
            if value is None:
                return False
            return value == expected or math.isnan(value) and math.isnan(expected)
        wait_for(matches, timeout, f"Prometheus: {expr} == {expected} (log: {self.log_tail()})")
        return expected

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's output, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def write_config(path: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> Path:
    """A prometheus.yml (JSON is YAML) scraping ``targets`` (``host:port``) as job ``rlmon``."""
    interval = f"{SCRAPE_INTERVAL_S}s"
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "rlmon", "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def running_prometheus(work_dir: Path, targets: Sequence[str],
                       rule_files: Sequence[Path] = (ALERT_RULES,),
                       timeout: float = 60.0) -> Iterator[PrometheusServer]:
    """Start ``prometheus`` on a free loopback port with its config and TSDB in ``work_dir``;
    yield it once ``/-/ready`` answers 200; always stop it (SIGTERM, wait, SIGKILL)."""
    binary = prometheus_binary()
    work_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(work_dir / "prometheus.yml", targets, rule_files)
    port = free_port()
    log_path = work_dir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_for(lambda: _ready(server), timeout, "Prometheus /-/ready")
        yield server
    finally:
        stop_process(process, timeout=30)


def _ready(server: PrometheusServer) -> bool:
    if server.process.poll() is not None:
        pytest.fail(f"prometheus exited with {server.process.returncode}: {server.log_tail()}")
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
