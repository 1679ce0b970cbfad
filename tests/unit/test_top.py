"""``rlmon top``: the view built from a fixed ``/metrics`` text and drawn with rich (recorded).

The ``/metrics`` text is the collector's own exposition of a factory snapshot, so these tests
read exactly what a live collector serves."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from prometheus_client import generate_latest
from rich.console import Console

from exporters.prometheus import make_registry
from rlmon.errors import ConfigError
from rlmon.top import (AlertTail, LiveDisplay, PlainDisplay, RankRow, RateTracker, TopOptions,
                       TopSource, TopView, metric_order, parse_exposition, view_from_samples)
from rlmon.top_render import alert_line, fmt, render, status_line
from snapshot_factory import T0, make_metric, make_snapshot


def metrics_text(snapshot, max_rank_labels: int = 64) -> str:
    """What the collector's /metrics serves for ``snapshot``."""
    registry = make_registry(lambda: snapshot, max_rank_labels=max_rank_labels,
                             process_metrics=False, version="test")
    return generate_latest(registry).decode()


def view_of(snapshot, **kwargs) -> TopView:
    """The view of one reading of ``snapshot``'s /metrics."""
    return view_from_samples(parse_exposition(metrics_text(snapshot)), **kwargs)


def drawn(view: TopView, width: int = 120) -> str:
    """The rich view as plain text, as a terminal of ``width`` columns would show it."""
    console = Console(record=True, width=width, file=open("/dev/null", "w"))
    console.print(render(view))
    return console.export_text()


def test_view_reads_ranks_metrics_and_counters():
    """Ranks, steps, drops, rejected frames, flagged values and alert counts come from /metrics."""
    view = view_of(make_snapshot())
    assert view.run_id == "run-test" and view.world_size == 2 and view.ranks_known == 2
    assert [(r.rank, r.step, r.dropped) for r in view.ranks] == [(0, 49, 0), (1, 49, 3)]
    assert view.max_step == 49 and view.per_rank
    assert view.rejected == {"malformed": 2, "bad_version": 1}
    assert view.dropped == {"queue_full": 3} and view.flagged == {"nan": 1}
    assert view.alert_counts == {"INFO": 1, "WARNING": 1, "CRITICAL": 1}
    assert view.stop is None and view.taken_at == T0 + 100.0


def test_metrics_come_in_key_order_with_trend_arrows():
    """Key metrics first, then rewards/*, then the rest; arrows follow the window's slope."""
    rows = {row.name: row for row in view_of(make_snapshot()).metrics}
    assert list(rows) == ["reward", "kl_div", "policy_loss", "entropy", "rewards/check_answer"]
    assert rows["reward"].arrow == "↑"  # rises 0.01 a step
    assert rows["kl_div"].arrow == "→"  # flat
    assert rows["policy_loss"].arrow == "↓"  # falls 0.01 a step
    assert rows["reward"].step == 49 and math.isclose(rows["reward"].value, 0.99, abs_tol=0.05)


def test_metric_order_puts_known_names_first_and_hides_the_step_count():
    """The announced step count is not a metric row."""
    assert metric_order(["zeta", "rewards/b", "kl", "reward", "total_steps", "alpha"]) == [
        "reward", "kl", "rewards/b", "alpha", "zeta"]


def test_a_logged_total_steps_becomes_the_progress_total():
    """A run that logs ``total_steps`` gets a progress bar without --total-steps."""
    snapshot = make_snapshot(metrics=("reward",))
    announced = make_metric("total_steps", np.full((2, 50), 300.0), np.arange(50))
    snapshot = dataclasses.replace(snapshot, metrics={**snapshot.metrics, "total_steps": announced})
    view = view_of(snapshot)
    assert view.total_steps == 300 and [m.name for m in view.metrics] == ["reward"]
    assert "step 49/300 (16%)" in drawn(view)
    assert view_of(make_snapshot(), total_steps=200).total_steps == 200


def test_stop_state_is_read_and_drawn():
    """A decided stop shows its step, generation, severity, source and acknowledgements."""
    view = view_of(make_snapshot(stop=True))
    assert (view.stop.at_step, view.stop.generation, view.stop.acked) == (32, 1, 1)
    text = drawn(view)
    assert "STOP at step 32 (generation 1, CRITICAL, detector:kl)" in text
    assert "acknowledged by 1/2 ranks" in text


def test_rich_view_shows_progress_metrics_ranks_and_health():
    """The drawn view holds the progress bar line, the metric table with arrows, the ranks and
    the counters."""
    view = view_of(make_snapshot(), total_steps=100)
    text = drawn(view)
    assert "step 49/100 (50%)" in text and "━" in text
    assert "reward" in text and "↑" in text and "↓" in text
    assert "ranks" in text and "queue_full 3" in text
    assert "malformed 2" in text and "bad_version 1" in text
    assert "stop: none" in text and "WARNING 1" in text


def test_past_the_rank_label_bound_the_view_lists_the_worst_ranks():
    """With per-rank series off, the ranks furthest behind are shown and the view says so."""
    text = metrics_text(make_snapshot(ranks=3), max_rank_labels=2)
    view = view_from_samples(parse_exposition(text))
    assert not view.per_rank and len(view.ranks) == 3 and view.ranks_known == 3
    assert "per-rank series are off" in drawn(view)


def test_status_line_is_plain_text():
    """The plain line has no escape codes and carries progress, metrics, alerts and the stop."""
    line = status_line(view_of(make_snapshot(stop=True), total_steps=100))
    assert "\x1b" not in line and "\n" not in line
    assert line.startswith("rlmon: step 49/100 (50%)")
    assert "reward " in line and "↑" in line and "alerts 3" in line
    assert "drops 3" in line and "rejected 3" in line and "STOP at step 32" in line


def test_status_line_without_data_says_why():
    """Before any reading the line is the reason there is none."""
    assert status_line(TopView(error="waiting for x/collector.json")) == \
        "rlmon: waiting for x/collector.json"


def test_alert_line_does_not_repeat_the_type():
    """An alert message that starts with its type is not prefixed twice."""
    alert = {"step": 7, "severity": "CRITICAL", "type": "KL_HIGH", "rank": -1,
             "message": "KL_HIGH: KL divergence 0.5 above 0.2 (kl)"}
    assert alert_line(alert) == ("rlmon: alert at step 7: CRITICAL KL_HIGH: KL divergence 0.5 "
                                 "above 0.2 (kl)")
    assert "rank 3: WARNING SILENT: quiet" in alert_line(
        {"step": 1, "severity": "WARNING", "type": "SILENT", "rank": 3, "message": "quiet"})


def test_rates_come_from_successive_readings():
    """Steps/s per rank from readings 2 s apart; a rank seen later uses its own first reading;
    a closed rank has no rate."""
    tracker = RateTracker()
    tracker.apply(TopView(taken_at=100.0, ranks=(RankRow(0, 10, 100.0, False, 0),)))
    view = tracker.apply(TopView(taken_at=101.0, ranks=(RankRow(0, 20, 101.0, False, 0),
                                                        RankRow(1, 5, 101.0, False, 0))))
    assert view.ranks[0].steps_per_second == 10.0 and math.isnan(view.ranks[1].steps_per_second)
    view = tracker.apply(TopView(taken_at=103.0, ranks=(RankRow(0, 30, 103.0, True, 0),
                                                        RankRow(1, 15, 103.0, False, 0))))
    assert math.isnan(view.ranks[0].steps_per_second)
    assert view.ranks[1].steps_per_second == 5.0 and view.steps_per_second == 5.0


def test_alert_tail_returns_whole_lines_only(tmp_path):
    """A half-written line waits for its end; malformed lines are skipped."""
    path = tmp_path / "alerts.jsonl"
    tail = AlertTail(path)
    assert tail.poll() == []
    path.write_text(json.dumps({"step": 1}) + "\nnot json\n" + '{"step": 2')
    assert tail.poll() == [{"step": 1}]
    with open(path, "a") as handle:
        handle.write("}\n")
    assert tail.poll() == [{"step": 2}]
    assert list(tail.recent) == [{"step": 1}, {"step": 2}]


def test_alert_tail_backlog_starts_at_a_line(tmp_path):
    """Started on a long file, the tail reads only the last ``backlog`` bytes, whole lines."""
    path = tmp_path / "alerts.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(100)))
    alerts = AlertTail(path, backlog=40).poll()
    assert alerts and alerts[-1] == {"step": 99} and len(alerts) < 5


def test_plain_display_prints_alerts_at_once_and_status_when_due_and_changed():
    """Alerts print as read; a status line every interval, and only when it changed."""
    lines, now = [], [0.0]
    display = PlainDisplay(lines.append, interval=5.0, clock=lambda: now[0])
    alert = {"step": 3, "severity": "WARNING", "type": "SPIKE", "message": "SPIKE: up"}
    view = view_of(make_snapshot())
    display.show(TopView(**{**_fields(view), "new_alerts": (alert,)}))
    assert lines[0].startswith("rlmon: alert at step 3") and lines[1].startswith("rlmon: step 49")
    now[0] = 1.0
    display.show(view)
    assert len(lines) == 2  # not due yet
    now[0] = 6.0
    display.show(view)
    assert len(lines) == 2  # due, but unchanged
    display.close(TopView(error="the collector (pid 1) is not running"))
    assert lines[-1] == "rlmon: the collector (pid 1) is not running\n"


def test_live_display_relays_output_as_a_terminal_shows_it():
    """Relayed output keeps the text after the last carriage return of each line and its
    colours (ANSI codes become rich styles)."""
    console = Console(record=True, width=80, force_terminal=True, file=open("/dev/null", "w"))
    LiveDisplay(console).output("10%\r50%\r100%\n\x1b[32mgreen\x1b[0m line\r\n")
    assert console.export_text() == "100%\ngreen line\n"


def test_source_without_a_collector_explains_and_never_raises(tmp_path):
    """No collector.json yet, then a dead collector's: the view says so."""
    source = TopSource(tmp_path, TopOptions())
    assert source.read().error.startswith("waiting for")
    (tmp_path / "collector.json").write_text(json.dumps({"pid": 2**22 + 12345, "metrics_url": ""}))
    view = source.read()
    assert not view.alive and "is not running" in view.error


@pytest.mark.parametrize("kwargs", [{"interval": 0}, {"plain_interval": -1}, {"total_steps": 0},
                                    {"max_metrics": 0}, {"duty_cycle": 0}])
def test_options_are_validated(kwargs):
    """Bad settings are a ConfigError naming the flag."""
    with pytest.raises(ConfigError):
        TopOptions(**kwargs)


def test_numbers_are_short():
    """Numbers fit a narrow column."""
    assert [fmt(v) for v in (0.41234, 1e-5, 34567.5, 12.0, math.nan)] == [
        "0.4123", "1e-05", "3.46e+04", "12", "nan"]


def _fields(view: TopView) -> dict:
    return {name: getattr(view, name) for name in TopView.__slots__}


def test_the_view_fits_a_short_terminal():
    """On a short terminal fewer metric rows, ranks and alerts are drawn, so nothing important
    is cropped; without a height everything is drawn."""
    snapshot = make_snapshot(ranks=8, metrics=("reward", "kl", "loss", "entropy", "a", "b", "c"))
    view = view_of(snapshot)
    alerts = tuple({"step": s, "severity": "INFO", "type": "T", "message": f"m{s}"}
                   for s in range(6))
    view = TopView(**{**_fields(view), "alerts": alerts})
    full, short = drawn(view), drawn_with_height(view, 28)
    assert " c " in full and " c " not in short and "reward" in short
    assert "m0" in full and "m0" not in short and "m5" in short
    assert len(short.splitlines()) <= 28 < len(full.splitlines())


def drawn_with_height(view: TopView, height: int) -> str:
    """The view fitted to ``height`` lines, as text."""
    console = Console(record=True, width=120, file=open("/dev/null", "w"))
    console.print(render(view, height))
    return console.export_text()
