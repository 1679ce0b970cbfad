"""The seed's PNG plots and render_reports: every file, valid PNGs, graceful skips, no matplotlib."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from collector.snapshot import CollectorSnapshot
from exporters import plots
from exporters.render import render_reports
from snapshot_factory import (T0, ema, grpo_collector_snapshot, make_metric, make_snapshot,
                              with_rank_history)

DPI = 60
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_PNGS = set(plots.PLOT_FILES)
REPO = Path(__file__).resolve().parents[2]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_valid_pngs(paths: list[Path]) -> None:
    """Every path is a PNG of a plausible size: at least 200×150 px and 3 KB at the test dpi."""
    for path in paths:
        data = path.read_bytes()
        width, height = png_size(data)
        assert width >= 200 and height >= 150, (path.name, width, height)
        assert len(data) > 3_000, path.name


@pytest.fixture(scope="module")
def factory_snapshot() -> CollectorSnapshot:
    """The factory's snapshot with per-rank history and a stop decision."""
    return with_rank_history(make_snapshot(stop=True))


@pytest.fixture(scope="module")
def grpo_snapshot() -> CollectorSnapshot:
    """A snapshot of the real collector state after a demo-like GRPO run with a KL blow-up."""
    return grpo_collector_snapshot()


@pytest.fixture(scope="module")
def grpo_reports(grpo_snapshot, tmp_path_factory) -> tuple[Path, list[Path]]:
    """render_reports() run once on the GRPO snapshot: (directory, paths written)."""
    directory = tmp_path_factory.mktemp("grpo_reports")
    return directory, render_reports(grpo_snapshot, directory, dpi=DPI)


def test_factory_snapshot_gets_every_plot_but_ppo(factory_snapshot, tmp_path):
    """The factory's metrics (no PPO-only ones) give every plot except ppo_mechanics.png."""
    paths = plots.write_all_plots(factory_snapshot, tmp_path, dpi=DPI)
    assert {p.name for p in paths} == SEED_PNGS - {"ppo_mechanics.png"}
    assert_valid_pngs(paths)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_collector_snapshot_gets_every_plot(grpo_reports):
    """A real collector snapshot of a GRPO run gives all nine seed PNGs."""
    _directory, paths = grpo_reports
    pngs = [p for p in paths if p.suffix == ".png"]
    assert [p.name for p in pngs] == list(plots.PLOT_FILES)
    assert_valid_pngs(pngs)


def test_dpi_scales_the_image(grpo_snapshot):
    """Doubling the dpi doubles the pixel size of a plot."""
    small = png_size(plots.render_pngs(grpo_snapshot, dpi=50, names=["rewards.png"])["rewards.png"])
    large = png_size(plots.render_pngs(grpo_snapshot, dpi=100, names=["rewards.png"])["rewards.png"])
    assert abs(large[0] - 2 * small[0]) <= 2 and abs(large[1] - 2 * small[1]) <= 2


def test_missing_metrics_skip_their_plots(tmp_path):
    """A snapshot with only entropy writes quality_metrics.png and the dashboard, nothing else."""
    snap = with_rank_history(make_snapshot(metrics=("entropy",)))
    names = {p.name for p in plots.write_all_plots(snap, tmp_path, dpi=DPI)}
    assert names == {"quality_metrics.png", "final_dashboard.png"}


def test_snapshot_without_metrics_or_history_writes_nothing_and_does_not_raise(tmp_path, caplog):
    """No metrics, or live metrics without history: no PNG, no error logged."""
    empty = CollectorSnapshot(run_id="r", started_at=T0, taken_at=T0, world_size=1,
                              kl_threshold=0.1)
    live = make_snapshot()
    live = dataclasses.replace(live, alerts=(), metrics=MappingProxyType({
        name: dataclasses.replace(m, steps=m.steps[:0], values=m.values[:0])
        for name, m in live.metrics.items()}))
    with caplog.at_level(logging.ERROR, logger="rlmon.exporters.plots"):
        assert plots.write_all_plots(empty, tmp_path / "a", dpi=DPI) == []
        assert plots.write_all_plots(live, tmp_path / "b", dpi=DPI) == []
        assert plots.write_dashboard(empty, tmp_path / "d.png") is None
    assert not caplog.records


def test_odd_values_and_hostile_names_still_render(tmp_path, caplog):
    """NaN, Inf, a single point, '$' and '<script>' in names and run id: every plot still draws."""
    steps = np.arange(5)
    values = np.array([[np.nan, 1.0, np.inf, 2.0, 3.0], [0.5, np.nan, 1.0, -np.inf, 2.0]])
    metrics = {name: make_metric(name, values, steps)
               for name in ("reward", "kl", "rewards/$cost$ <script>", "entropy")}
    metrics["loss"] = make_metric("loss", np.array([[1.0], [2.0]]), np.array([3]))
    snap = with_rank_history(dataclasses.replace(
        make_snapshot(stop=True), run_id="$run$ <b>", metrics=MappingProxyType(metrics)))
    with caplog.at_level(logging.ERROR, logger="rlmon.exporters.plots"):
        paths = plots.write_all_plots(snap, tmp_path, dpi=DPI)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert "reward_statistics.png" in {p.name for p in paths}
    assert_valid_pngs(paths)


def test_a_failing_plot_is_logged_and_the_others_are_written(factory_snapshot, monkeypatch,
                                                              caplog):
    """A builder that raises costs only its own file, with the traceback logged."""
    def broken(_snapshot):
        raise RuntimeError("boom")
    monkeypatch.setitem(plots._BUILDERS, "rewards.png", broken)
    with caplog.at_level(logging.ERROR, logger="rlmon.exporters.plots"):
        names = set(plots.render_pngs(factory_snapshot, dpi=DPI,
                                      names=["rewards.png", "kl_divergence.png"]))
    assert names == {"kl_divergence.png"}
    assert any("boom" in (r.exc_text or str(r.exc_info)) for r in caplog.records)


def test_many_ranks_are_drawn_as_a_band(tmp_path):
    """Above MAX_RANK_LINES ranks the per-rank lines become one min–max band (legend stays short)."""
    snap = with_rank_history(make_snapshot(ranks=3), ranks=plots.MAX_RANK_LINES + 4)
    fig = plots.rewards_figure(snap)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert not any(label.startswith("rank ") for label in labels)
    assert any("min–max" in label for label in labels)


def test_few_ranks_get_one_labelled_line_each(factory_snapshot):
    """With two ranks the legend names 'rank 0' and 'rank 1' beside the mean."""
    labels = plots.kl_figure(factory_snapshot).axes[0].get_legend_handles_labels()[1]
    assert {"rank 0", "rank 1", "mean of 2 ranks"} <= set(labels)
    assert any(label.startswith("critical threshold") for label in labels)
    assert "stop at step 32" in labels


def test_every_time_axis_is_labelled(grpo_snapshot):
    """Every visible subplot has a title and axis labels; step axes say 'step', spans 'seconds'."""
    for name in ("loss_figure", "rewards_figure", "kl_figure", "quality_figure", "ppo_figure",
                 "dashboard_figure"):
        fig = getattr(plots, name)(grpo_snapshot)
        for ax in (a for a in fig.axes if a.get_visible()):
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
    dashboard = plots.dashboard_figure(grpo_snapshot)
    step_time = [a for a in dashboard.axes if a.get_title().startswith("Step time")][0]
    assert step_time.get_xlabel() == "step" and "seconds" in step_time.get_ylabel()


def test_rendering_restores_matplotlib_settings(factory_snapshot):
    """Styles are applied in a context: rcParams are the same before and after rendering."""
    import matplotlib
    before = dict(matplotlib.rcParams)
    plots.render_pngs(factory_snapshot, dpi=DPI, names=["rewards.png"])
    assert dict(matplotlib.rcParams) == before


def test_ema_series_matches_the_naive_reference():
    """ema_series' last value is the factory's slow EMA; NaN points keep the previous value."""
    values = np.random.default_rng(3).normal(size=50)
    assert plots.ema_series(values, 10)[-1] == pytest.approx(ema(values, 10))
    gappy = plots.ema_series([1.0, float("nan"), None, 3.0], 1)
    assert list(gappy) == [1.0, 1.0, 1.0, 3.0]


def test_step_reports_write_the_step_dashboard_and_page(grpo_snapshot, tmp_path):
    """render_reports(step=N) writes dashboard_step_N.png and summary_step_N.html only."""
    paths = render_reports(grpo_snapshot, tmp_path, step=40, dpi=DPI)
    assert [p.name for p in paths] == ["dashboard_step_40.png", "summary_step_40.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert "step 40" in (tmp_path / "summary_step_40.html").read_text(encoding="utf-8")


def test_final_reports_write_every_file_and_embed_the_plots(grpo_reports):
    """render_reports() writes the PNGs, then the JSON, then the HTML embedding every PNG."""
    tmp_path, paths = grpo_reports
    names = [p.name for p in paths]
    assert names[:-2] == list(plots.PLOT_FILES)
    assert names[-2:] == ["monitoring_data.json", "final_summary.html"]
    page = (tmp_path / "final_summary.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(plots.PLOT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert 'href="monitoring_data.json"' in page
    json.loads((tmp_path / "monitoring_data.json").read_text(encoding="utf-8"))


def test_without_matplotlib_one_warning_and_the_text_reports(tmp_path):
    """matplotlib unimportable: no PNG, exactly one warning naming the extra, HTML and JSON written."""
    script = textwrap.dedent(f"""
        import logging, sys
        sys.modules["matplotlib"] = None
        sys.path.insert(0, {str(REPO / "tests" / "unit")!r})
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from snapshot_factory import make_snapshot
        from exporters import plots
        from exporters.render import render_reports
        snap = make_snapshot()
        assert not plots.plots_available()
        assert plots.write_all_plots(snap, {str(tmp_path)!r}) == []
        assert plots.plot_reward_history({{"a": [1.0]}}, {str(tmp_path / "x.png")!r}) is None
        print(sorted(p.name for p in render_reports(snap, {str(tmp_path)!r})))
        print(sorted(p.name for p in render_reports(snap, {str(tmp_path)!r}, step=3)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['final_summary.html', 'monitoring_data.json']",
                                        "['summary_step_3.html']"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert 'pip install "rlmon[plots]"' in warnings[0] and "matplotlib" in warnings[0]
    assert not list(tmp_path.glob("*.png"))
