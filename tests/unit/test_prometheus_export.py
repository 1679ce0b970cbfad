"""The Prometheus exporter: names pass promtool, values match the snapshot, labels stay bounded."""

from __future__ import annotations

import dataclasses
import math
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from types import MappingProxyType

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus import (MetricsServer, SnapshotCollector, installed_version,
                                  make_registry)
from snapshot_factory import make_metric, make_snapshot, make_stop
from tests.components import require_binary


@pytest.fixture
def serve():
    """Start MetricsServers for a test and stop every one of them afterwards."""
    servers: list[MetricsServer] = []

    def start(snapshot, **kwargs) -> MetricsServer:
        server = MetricsServer(lambda: snapshot, **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def fetch(url: str, accept: str | None = None, timeout: float = 5.0) -> str:
    """GET ``url`` and return the body as text."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode("utf-8")


def scrape(snapshot, **kwargs) -> str:
    """Render ``snapshot`` in the Prometheus text format without a server."""
    return generate_latest(make_registry(lambda: snapshot, **kwargs)).decode("utf-8")


def samples(text: str) -> list:
    """Every sample in a text-format exposition."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample_map(text: str) -> dict:
    """``{(name, frozenset(labels.items())): value}`` for every sample in ``text``."""
    return {(s.name, frozenset(s.labels.items())): s.value for s in samples(text)}


def value_of(text: str, name: str, **labels) -> float:
    """The value of the one sample named ``name`` with exactly ``labels``."""
    return sample_map(text)[(name, frozenset(labels.items()))]


def names(text: str) -> set[str]:
    """Names of every sample in ``text``."""
    return {s.name for s in samples(text)}


def promtool_or_skip() -> str:
    """Path to promtool; a missing promtool fails under CI and skips elsewhere."""
    return require_binary("promtool", "scripts/setup.sh installs Debian's prometheus package")


def test_promtool_check_metrics_reports_nothing(serve):
    """A realistic scrape fetched over a real loopback port passes `promtool check metrics`."""
    promtool = promtool_or_skip()
    server = serve(make_snapshot(ranks=4, stop=True))
    body = fetch(server.url)
    result = subprocess.run([promtool, "check", "metrics"], input=body.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"" and result.stderr == b""


def test_promtool_accepts_aggregate_only_and_empty_output():
    """promtool is silent for the aggregates-only mode, an empty snapshot and no snapshot."""
    promtool = promtool_or_skip()
    empty = make_snapshot(ranks=0, metrics=())
    for text in (scrape(make_snapshot(ranks=100), max_rank_labels=64), scrape(None),
                 scrape(empty)):
        result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                capture_output=True, timeout=30)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_every_name_is_prefixed_and_counters_end_total():
    """Every family starts rlmon_ and every counter family ends _total."""
    text = scrape(make_snapshot(stop=True))
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("rlmon_") for f in families)
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)


def test_values_match_snapshot():
    """Per-rank values, aggregates, window stats and counters equal the snapshot's numbers."""
    snap = make_snapshot(ranks=3, stop=True)
    text = scrape(snap, process_metrics=False)
    reward = snap.metrics["reward"]
    for rank, value in reward.last_by_rank.items():
        assert value_of(text, "rlmon_metric_value", metric="reward", rank=str(rank)) == value
    assert value_of(text, "rlmon_metric_aggregate", metric="reward", agg="max") == \
        reward.aggregate["max"]
    assert value_of(text, "rlmon_metric_aggregate_step", metric="reward") == 49
    assert value_of(text, "rlmon_metric_window", metric="reward", stat="slope") == \
        pytest.approx(reward.window.slope)
    assert value_of(text, "rlmon_metric_window_points", metric="reward") == 50
    assert value_of(text, "rlmon_frames_rejected_total", reason="malformed") == 2
    assert value_of(text, "rlmon_rank_dropped_events_total", rank="1", reason="queue_full") == 3
    assert value_of(text, "rlmon_dropped_events_total", reason="queue_full") == 3
    assert value_of(text, "rlmon_alerts_total", type="kl_divergence", severity="CRITICAL") == 1
    assert value_of(text, "rlmon_ranks_known") == 3
    assert value_of(text, "rlmon_build_info", version=installed_version(), run_id="run-test") == 1


def test_stop_state_is_exported():
    """A decided stop shows as requested=1 with its step, generation, time and short info."""
    long_reason = "KL divergence far above threshold " * 10
    snap = dataclasses.replace(make_snapshot(), stop=dataclasses.replace(
        make_stop(), reason=long_reason + "\nsecond line"))
    text = scrape(snap)
    assert value_of(text, "rlmon_stop_requested") == 1
    assert value_of(text, "rlmon_stop_at_step") == 32
    assert value_of(text, "rlmon_stop_generation") == 1
    assert value_of(text, "rlmon_stop_decided_timestamp_seconds") == snap.stop.decided_at
    (info,) = [s for s in samples(text) if s.name == "rlmon_stop_info"]
    assert len(info.labels["reason"]) <= 80 and "\n" not in info.labels["reason"]


def test_no_stop_omits_stop_details():
    """Without a stop, requested and generation are 0 and the step/time/info have no sample."""
    text = scrape(make_snapshot())
    assert value_of(text, "rlmon_stop_requested") == 0
    assert value_of(text, "rlmon_stop_generation") == 0
    assert not names(text) & {"rlmon_stop_at_step", "rlmon_stop_info",
                              "rlmon_stop_decided_timestamp_seconds"}


def test_rank_labels_bounded_past_max_rank_labels():
    """With 100 ranks and max_rank_labels=64 no sample carries a rank label; aggregates remain."""
    text = scrape(make_snapshot(ranks=100, metrics=("reward", "kl_div")), max_rank_labels=64)
    worst = {"rlmon_worst_rank_last_step", "rlmon_worst_rank_silence_seconds"}
    assert not [s for s in samples(text) if "rank" in s.labels and s.name not in worst]
    assert len([s for s in samples(text) if s.name == "rlmon_worst_rank_last_step"]) <= 5
    assert value_of(text, "rlmon_ranks_known") == 100
    assert value_of(text, "rlmon_rank_labels_limit") == 64
    assert value_of(text, "rlmon_ranks_last_step", agg="max") == 49
    assert ("rlmon_metric_aggregate", frozenset({("metric", "reward"), ("agg", "mean")})) in \
        sample_map(text)


def test_rank_labels_present_at_the_bound():
    """Exactly max_rank_labels ranks still get per-rank series, one per rank."""
    text = scrape(make_snapshot(ranks=64, metrics=2), max_rank_labels=64)
    ranks = {s.labels["rank"] for s in samples(text) if s.name == "rlmon_rank_last_step"}
    assert ranks == {str(r) for r in range(64)}


def test_world_size_above_bound_disables_rank_labels():
    """A declared world size above the bound switches to aggregates before every rank connects."""
    text = scrape(make_snapshot(ranks=2, world_size=128), max_rank_labels=64)
    assert not [s for s in samples(text) if "rank" in s.labels and not s.name.startswith("rlmon_worst_")]


def test_nan_values_pass_through_gauges_and_never_reach_counters():
    """A NaN last value is exported as NaN; undefined window stats and NaN counts are left out."""
    steps = np.arange(5)
    values = np.array([[0.1, 0.2, math.nan, math.nan, math.nan]])
    nan_metric = make_metric("loss", values, steps)
    empty = make_metric("never_finite", np.full((1, 5), math.nan), steps)
    snap = dataclasses.replace(
        make_snapshot(ranks=1, metrics=()),
        metrics=MappingProxyType({"loss": nan_metric, "never_finite": empty}),
        frames_rejected_by_reason=MappingProxyType({"malformed": math.nan, "oversize": -1,
                                                    "bad_version": 4}))
    text = scrape(snap)
    assert math.isnan(value_of(text, "rlmon_metric_value", metric="loss", rank="0"))
    assert value_of(text, "rlmon_metric_window", metric="loss", stat="mean") == \
        pytest.approx(0.15)
    assert not [s for s in samples(text)
                if s.name == "rlmon_metric_window" and s.labels["metric"] == "never_finite"]
    assert value_of(text, "rlmon_metric_window_points", metric="never_finite") == 0
    counters = [s for s in samples(text) if s.name.endswith("_total")]
    assert counters and all(math.isfinite(s.value) and s.value >= 0 for s in counters)
    rejected = {s.labels["reason"] for s in samples(text)
                if s.name == "rlmon_frames_rejected_total"}
    assert rejected == {"bad_version"}


def test_label_values_with_any_utf8_are_escaped():
    """Metric names with quotes, backslashes, newlines and non-ASCII round-trip as label values."""
    odd = 'rewards/"quoted"\\back\nslash/ñ/奖励'
    steps = np.arange(3)
    metric = make_metric(odd, np.array([[1.0, 2.0, 3.0]]), steps)
    snap = dataclasses.replace(make_snapshot(ranks=1, metrics=()),
                               metrics=MappingProxyType({odd: metric}))
    text = scrape(snap)
    assert value_of(text, "rlmon_metric_value", metric=odd, rank="0") == 3.0


def test_no_snapshot_exports_only_build_info():
    """Before the first snapshot the scrape holds build info and nothing else of rlmon's."""
    text = scrape(None, process_metrics=False, version="9.9")
    assert names(text) == {"rlmon_build_info"}
    assert value_of(text, "rlmon_build_info", version="9.9", run_id="") == 1


def test_empty_snapshot_does_not_crash():
    """A snapshot with no metrics, ranks or counts renders, with zero gauges and no samples."""
    snap = make_snapshot(ranks=0, metrics=())
    text = scrape(snap)
    assert value_of(text, "rlmon_ranks_known") == 0
    assert "rlmon_metric_value" not in names(text)


def test_process_metrics_are_namespaced():
    """Process metrics carry the rlmon_ prefix so every exported name starts rlmon_."""
    text = scrape(None)
    process = [n for n in names(text) if "process_" in n]
    assert all(n.startswith("rlmon_process_") for n in process)


def test_registry_is_private():
    """The collector never lands in prometheus_client's global REGISTRY."""
    make_registry(lambda: make_snapshot())
    MetricsServer(lambda: make_snapshot())
    assert b"rlmon_" not in generate_latest(REGISTRY)


def test_describe_returns_nothing():
    """describe() is empty, so registering never scrapes a snapshot."""
    calls = []
    collector = SnapshotCollector(lambda: calls.append(1))
    assert collector.describe() == [] and calls == []


def test_negative_max_rank_labels_is_rejected():
    """A negative rank bound is a configuration error."""
    with pytest.raises(ValueError):
        SnapshotCollector(lambda: None, max_rank_labels=-1)


def test_server_binds_loopback_by_default(serve):
    """start() with no host binds 127.0.0.1 on a free port and the URL says so."""
    server = serve(make_snapshot())
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    assert "rlmon_build_info" in fetch(server.url)


def test_server_serves_openmetrics_when_asked(serve):
    """An OpenMetrics Accept header gets a body the strict OpenMetrics parser accepts."""
    server = serve(make_snapshot(stop=True))
    body = fetch(server.url, accept=OPENMETRICS)
    assert body.endswith("# EOF\n")
    assert any(f.name == "rlmon_frames_received" for f in parse_om(body))


def test_server_reflects_the_latest_snapshot():
    """Each scrape reads the source again, so a new snapshot shows on the next scrape."""
    current = {"snap": None}
    server = MetricsServer(lambda: current["snap"], process_metrics=False)
    server.start()
    try:
        assert "rlmon_ranks_known" not in fetch(server.url)
        current["snap"] = make_snapshot(ranks=2)
        assert value_of(fetch(server.url), "rlmon_ranks_known") == 2
    finally:
        server.stop()


def test_scrape_error_fails_the_request():
    """A source that raises makes the scrape fail with an HTTP error; the server keeps serving."""
    def broken():
        raise RuntimeError("boom")

    server = MetricsServer(broken, process_metrics=False)
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError):
            fetch(server.url)
        assert server.running
    finally:
        server.stop()


def test_stop_closes_socket_and_joins_thread():
    """stop() joins the serving thread, frees the port, and may be called twice."""
    server = MetricsServer(lambda: None, process_metrics=False)
    port = server.start()
    assert server.running
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_start_twice_is_an_error(serve):
    """A started server refuses a second start()."""
    server = serve(make_snapshot())
    with pytest.raises(RuntimeError):
        server.start()


def test_unstarted_server_has_no_address():
    """address/url before start() raise instead of inventing a port."""
    with pytest.raises(RuntimeError):
        _ = MetricsServer(lambda: None).url


def test_tls_when_cert_and_key_given(tmp_path):
    """With certfile and keyfile the endpoint speaks HTTPS and the URL says https."""
    openssl = require_binary("openssl", "scripts/setup.sh installs it")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = MetricsServer(lambda: None, process_metrics=False)
    server.start(certfile=str(cert), keyfile=str(key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with urllib.request.urlopen(server.url, context=context, timeout=5) as response:
            assert b"rlmon_build_info" in response.read()
    finally:
        server.stop()


def test_scrape_time_64_ranks_50_metrics(serve):
    """Quick check (printed, not asserted): scrape time over HTTP at 64 ranks x 50 metrics."""
    server = serve(make_snapshot(ranks=64, metrics=50))
    fetch(server.url)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        body = fetch(server.url)
        timings.append(time.perf_counter() - start)
    print(f"\n/metrics at 64 ranks x 50 metrics: median {1000 * sorted(timings)[2]:.1f} ms, "
          f"{len(body)} bytes, {body.count(chr(10))} lines")
    assert "rlmon_metric_value" in body


def test_worst_ranks_name_the_ranks_behind_past_the_bound():
    """Past the bound, the worst-k series name the ranks furthest behind, at most five of them."""
    snap = make_snapshot(ranks=100, metrics=("reward",))
    behind = {r: dataclasses.replace(info, last_step=3) if r in (17, 42) else info
              for r, info in snap.ranks.items()}
    snap = dataclasses.replace(snap, ranks=MappingProxyType(behind))
    text = scrape(snap, max_rank_labels=64)
    named = {s.labels["rank"]: s.value for s in samples(text) if s.name == "rlmon_worst_rank_last_step"}
    assert len(named) == 5 and named["17"] == 3 and named["42"] == 3


def test_scrape_of_1024_ranks_stays_small():
    """A 1,024-rank, 50-metric snapshot scrapes to aggregates only (timing is a benchmark, not here)."""
    text = scrape(make_snapshot(ranks=1024, metrics=50), max_rank_labels=64)
    assert len(samples(text)) < 2000
