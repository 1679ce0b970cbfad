"""A real Prometheus scrapes a real collector fed by torchrun; checked through its HTTP API.

One module-scoped run: Prometheus (1 s scrapes, rlmon's alert rules loaded) and a standalone
collector start, a foreign client sends one garbage frame, then the 2-rank toy trainer runs with
the RL metrics, a NaN and an unreadable value at step 50 and a KL spike at step 250 that stops
it. The collector stays up afterwards, so Prometheus keeps scraping the final state.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from tests.integration.helpers import (REPO, TOY_TRAINER, child_env, free_port, read_json,
                                       running_collector, sample_value, scrape_until, stop_process,
                                       torchrun_command, wait_for)
from tests.integration.prometheus import (ALERT_RULES, DASHBOARD, SCRAPE_INTERVAL_S,
                                          PrometheusServer, running_prometheus)

STEPS, KL_SPIKE_AT, BAD_VALUES_AT = 400, 250, 50
TRAIN_FLAGS = ("--steps", str(STEPS), "--step-seconds", "0.02", "--kl-spike-at", str(KL_SPIKE_AT),
               "--bad-values-at", str(BAD_VALUES_AT), "--rl-metrics")
RL_METRICS = ("rewards/format", "rewards/answer", "policy_loss", "value_loss", "clip_fraction",
              "entropy", "response_length")
ACTIVE_ALERTS = {"RlmonStopRequested", "RlmonKLHigh", "RlmonKLCritical", "RlmonDetectorCritical",
                 "RlmonMetricNaN", "RlmonNonFiniteValues", "RlmonEventsDropped",
                 "RlmonFramesRejected"}
"""The rules this run makes pending or firing; every other rule must stay inactive."""


@dataclass(frozen=True, slots=True)
class ScrapedRun:
    """The finished run, still served: Prometheus, the ranks' result files, collector.json."""

    prometheus: PrometheusServer
    ranks: list[dict]
    collector: dict
    started: float

    @property
    def last_step(self) -> int:
        """The step both ranks stopped at."""
        return self.ranks[0]["last_step"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapedRun]:
    """Prometheus scraping a collector that served one stopped torchrun job (see the module doc)."""
    tmp = tmp_path_factory.mktemp("prometheus_server")
    metrics_port = free_port()
    with running_prometheus(tmp / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prometheus, \
            running_collector(tmp / "run", "--metrics-port", str(metrics_port)) as (_, info):
        started = time.time()
        _send_garbage(info)
        # Prometheus applies its targets a few seconds after start: train once it scrapes
        prometheus.wait_value('up{job="rlmon"}', 1, timeout=60)
        ranks = _train(tmp / "ranks", info["endpoint"])
        prometheus.wait_value('rlmon_ranks_closed{job="rlmon"}', 2, timeout=30)
        yield ScrapedRun(prometheus, ranks, info, started)


def _send_garbage(info: dict) -> None:
    """One frame that is not msgpack, from a foreign client; wait until it is counted."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(info["endpoint"])
        sock.send(b"\xc1garbage")
        scrape_until(info["metrics_url"], lambda text: sample_value(
            text, "rlmon_frames_rejected_total", reason="malformed") == 1, 30, "the rejection")
    finally:
        sock.close(linger=0)
        context.term()


def _train(out: Path, endpoint: str) -> list[dict]:
    """Run the toy trainer under torchrun against ``endpoint``; return both ranks' results."""
    command = [*torchrun_command(2), str(TOY_TRAINER), "--out", str(out), *TRAIN_FLAGS]
    job = subprocess.Popen(command, env=child_env(RLMON_ENDPOINT=endpoint),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = job.communicate(timeout=240)
    finally:
        stop_process(job)
    assert job.returncode == 0, output
    ranks = [read_json(out / f"rank{rank}.json") for rank in (0, 1)]
    assert ranks[0]["last_step"] == ranks[1]["last_step"] > KL_SPIKE_AT, ranks
    return ranks


# -- series and values -----------------------------------------------------------------------------

def test_prometheus_scrapes_the_collector(run):
    """The collector is an up target of job rlmon, scraped without errors."""
    targets = run.prometheus.api("targets")["activeTargets"]
    health = [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets]
    assert health == [("rlmon", "up", "")]
    assert targets[0]["scrapeUrl"] == run.collector["metrics_url"]
    assert run.prometheus.value('up{job="rlmon"}') == 1
    assert run.prometheus.value("rlmon_build_info") == 1


def test_rank_progress_reaches_prometheus(run):
    """Each rank's last step, the step range over ranks and the closed ranks arrive."""
    prom, last = run.prometheus, run.last_step
    for rank in ("0", "1"):
        assert prom.value(f'rlmon_rank_last_step{{rank="{rank}"}}') == last
        assert prom.value(f'rlmon_rank_closed{{rank="{rank}"}}') == 1
    assert prom.value('rlmon_ranks_last_step{agg="min"}') == prom.value(
        'rlmon_ranks_last_step{agg="max"}') == last
    assert prom.value("rlmon_world_size") == prom.value("rlmon_ranks_known") == 2
    assert prom.value("time() - rlmon_rank_last_seen_timestamp_seconds{rank=\"1\"}") < 300
    # several scrapes while the ranks trained, so rates over the run are meaningful
    assert prom.value('changes(rlmon_rank_last_step{rank="1"}[10m])') >= 3


def test_logged_values_and_aggregates_reach_prometheus(run):
    """Per-rank values, cross-rank aggregates and window statistics of logged metrics arrive."""
    prom, last = run.prometheus, run.last_step
    progress = last / STEPS
    assert prom.value('rlmon_metric_value{metric="reward", rank="1"}') == progress
    assert prom.value('rlmon_metric_aggregate{metric="reward", agg="mean"}') == progress
    assert prom.value('rlmon_metric_aggregate_step{metric="reward"}') == last
    assert prom.value('rlmon_metric_window{metric="reward", stat="last"}') == progress
    slope = prom.value('rlmon_metric_window{metric="reward", stat="slope"}')
    assert slope == pytest.approx(1 / STEPS)
    assert prom.value('rlmon_metric_value{metric="response_length", rank="1"}') == pytest.approx(
        65 + 32 * progress)
    assert prom.value('rlmon_metric_aggregate{metric="response_length", agg="mean"}') == \
        pytest.approx(64.5 + 32 * progress)
    logged = {s["metric"]["metric"] for s in prom.query('rlmon_metric_value{rank="0"}')}
    assert logged >= {"reward", "kl", "loss", "grad", *RL_METRICS}


def test_frame_and_batch_counters_reach_prometheus(run):
    """Frames by kind, batches and scalars per rank match what the ranks say they sent."""
    prom = run.prometheus
    sent = sum(rank["stats"]["batches_sent"] for rank in run.ranks)
    assert prom.value('rlmon_frames_received_total{kind="batch"}') == sent
    assert prom.value("sum(rlmon_rank_batches_received_total)") == sent
    assert prom.value("rlmon_batches_received_total") == sent
    assert prom.value('rlmon_frames_received_total{kind="hello"}') == 2
    assert prom.value('rlmon_frames_received_total{kind="bye"}') == 2
    assert prom.value('rlmon_frames_rejected_total{reason="malformed"}') == 1
    per_step = 4 + len(RL_METRICS)  # reward, kl, loss, grad and the RL metrics, every step
    steps = run.last_step + 1
    assert prom.value('rlmon_rank_scalars_received_total{rank="0"}') == steps * per_step
    assert prom.value('rlmon_rank_scalars_received_total{rank="1"}') == steps * per_step + 1


def test_nan_and_dropped_values_reach_prometheus(run):
    """A logged NaN passes through as NaN and is counted; the unreadable value is a counted drop."""
    prom = run.prometheus
    assert math.isnan(prom.value('rlmon_metric_value{metric="nan_probe", rank="1"}'))
    nan_now = prom.query("rlmon_metric_value != rlmon_metric_value")
    assert [s["metric"]["metric"] for s in nan_now] == ["nan_probe"]
    assert prom.value('rlmon_values_flagged_total{reason="nan"}') == 1
    assert prom.value('rlmon_dropped_events_total{reason="bad_value"}') == 1
    assert prom.value('rlmon_rank_dropped_events_total{rank="1", reason="bad_value"}') == 1
    assert prom.query('rlmon_rank_dropped_events_total{rank="0"}') == []


def test_kl_spike_stop_state_reaches_prometheus(run):
    """After the KL spike: KL above its threshold, the CRITICAL alert and the stop state arrive."""
    prom, last = run.prometheus, run.last_step
    assert prom.value('rlmon_metric_aggregate{metric="kl", agg="mean"}') == 1.0
    assert prom.value("rlmon_kl_threshold") == 0.1
    assert prom.value('rlmon_alerts_total{type="KL_HIGH", severity="CRITICAL"}') >= 1
    assert prom.value("rlmon_stop_requested") == 1
    assert prom.value("rlmon_stop_generation") == 1
    assert prom.value("rlmon_stop_at_step") == last
    assert prom.value("rlmon_stop_acked_ranks") == 2
    assert 0 < time.time() - prom.value("rlmon_stop_decided_timestamp_seconds") < 300
    [info] = prom.query("rlmon_stop_info")
    assert info["metric"]["source"] == "detector:kl_high"
    assert info["metric"]["severity"] == "CRITICAL"
    assert "KL" in info["metric"]["reason"] and info["metric"]["reason"] == run.ranks[0]["reason"]


# -- alert rules -----------------------------------------------------------------------------------

def test_alert_rules_load_and_evaluate_cleanly(run):
    """Prometheus loads every rule; each evaluates cleanly, with severity, summary, description."""
    def rules() -> list[dict]:
        groups = run.prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]
    names = re.findall(r"^\s*- alert: (\w+)$", ALERT_RULES.read_text(), re.MULTILINE)
    assert sorted(rule["name"] for rule in rules()) == sorted(names) and len(names) >= 10

    def evaluated() -> list[dict] | None:
        current = rules()
        return current if all(rule["health"] == "ok" for rule in current) else None
    for rule in wait_for(evaluated, 30, "every rule evaluated without error"):
        assert rule["type"] == "alerting"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["name"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["name"]
        assert rule.get("lastError", "") == "", (rule["name"], rule["lastError"])


def test_alert_rules_fire_on_the_real_run(run):
    """On the run's real series, exactly the expected rules go pending or firing."""
    def active() -> dict[str, str] | None:
        alerts = run.prometheus.api("alerts")["alerts"]
        states = {alert["labels"]["alertname"]: alert["state"] for alert in alerts}
        return states if set(states) == ACTIVE_ALERTS else None
    alerts = wait_for(active, 30, f"the active alerts to be {sorted(ACTIVE_ALERTS)}")
    assert alerts["RlmonStopRequested"] == "firing"
    [stop] = [a for a in run.prometheus.api("alerts")["alerts"]
              if a["labels"]["alertname"] == "RlmonStopRequested"]
    assert stop["labels"]["source"] == "detector:kl_high" and "KL" in stop["labels"]["reason"]
    assert stop["labels"]["severity"] == "warning"


# -- the Grafana dashboard -------------------------------------------------------------------------

REQUIRED_PANELS = ("reward", "rewards per reward function", "kl divergence", "losses",
                   "clip fraction", "entropy", "response length", "step per rank",
                   "steps per second", "last heard", "alerts", "dropped", "rejected", "stop state")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    flat = []
    for panel in dashboard["panels"]:
        flat.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return flat


def test_dashboard_is_provisionable():
    """The dashboard has uid, title, schemaVersion and a DS_PROMETHEUS variable every panel uses."""
    dashboard = _dashboard()
    assert dashboard["title"] == "rlmon" and dashboard["uid"] and dashboard["id"] is None
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [p["id"] for p in panels if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        assert all(t["datasource"] == source and t["expr"].strip() for t in panel["targets"])
    titles = " | ".join(p["title"].lower() for p in panels)
    assert [name for name in REQUIRED_PANELS if name not in titles] == []


def test_dashboard_uses_only_documented_metrics():
    """Every rlmon_* name in the dashboard is listed in docs/metrics.md (the exporter contract)."""
    documented = (REPO / "docs" / "metrics.md").read_text()
    used = set(re.findall(r"\brlmon_[a-z_]+", DASHBOARD.read_text()))
    assert used and sorted(name for name in used if f"`{name}`" not in documented) == []


def test_dashboard_panels_return_data_from_real_prometheus(run):
    """Each panel query, variables resolved as Grafana would, returns data from the run."""
    dashboard, prom = _dashboard(), run.prometheus
    values = _variable_values(dashboard, prom)
    end = time.time()  # the last evaluation point is now, so series born in the last scrape count
    start = end - SCRAPE_INTERVAL_S * math.ceil((end - run.started) / SCRAPE_INTERVAL_S)
    empty, queried = [], 0
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = _substitute(target["expr"], values)
            if target.get("instant"):
                result = prom.query(expr)
            else:
                result = prom.query_range(expr, start, end, SCRAPE_INTERVAL_S)
            queried += 1
            if not result:
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert queried >= len(REQUIRED_PANELS) and empty == []


def _variable_values(dashboard: dict, prom: PrometheusServer) -> dict[str, str]:
    """Values for the dashboard's variables: "All" of each query variable, textbox defaults, and
    Grafana's built-in intervals for a 1 s scrape interval."""
    values = {"__rate_interval": f"{4 * SCRAPE_INTERVAL_S}s",
              "__interval": f"{SCRAPE_INTERVAL_S}s", "__range": "1h"}
    for variable in dashboard["templating"]["list"]:
        kind, name = variable["type"], variable["name"]
        if kind in ("textbox", "constant", "custom"):
            values[name] = variable["current"].get("value") or variable["query"]
        elif kind == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            found = _label_values(prom, _substitute(query, values))
            assert found, f"variable {name}: {query} found nothing"
            escaped = [_regex_escape(value) for value in found]
            values[name] = "(" + "|".join(escaped) + ")" if variable.get("multi") else escaped[0]
    return values


def _label_values(prom: PrometheusServer, query: str) -> list[str]:
    """Evaluate Grafana's ``label_values([selector,] label)`` through the labels API."""
    match = re.fullmatch(r"label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)", query.strip())
    assert match, f"not a label_values() query: {query}"
    selector, label = match.groups()
    return prom.api(f"label/{label}/values", **({"match[]": selector} if selector else {}))


def _regex_escape(value: str) -> str:
    """Grafana's escaping of a multi-value variable inside a PromQL regex string literal."""
    return re.sub(r"[\\^$*+?.()|\[\]{}]", lambda m: "\\\\" + m.group(0), value)


def _substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with ``$name``, ``${name}`` and ``[[name]]`` replaced; unknown names fail."""
    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return values[name]
    return _VARIABLE.sub(replace, expr)
