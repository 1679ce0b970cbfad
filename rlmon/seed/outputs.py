"""``PlotManager`` and ``ReportGenerator``: the seed's plots and reports, from the event log.

Both rebuild the run's state offline from the event log in the monitor's ``output_dir`` (exactly
what ``rlmon report DIR`` does) and hand a snapshot to :mod:`exporters`; so they work during the
run and after it, but only where that run directory is readable (the embedded collector, or
``output_dir`` pointing at the collector's ``--out``). The embedded collector already writes every
file at the end of a run; these calls (re)write them wherever asked. The collector packages are
imported here lazily, never by ``import rlmon``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rlmon")


def _monitor_of(*objects: Any) -> Any:
    """The TrainingMonitor behind a metrics store, an analyzer or the monitor itself."""
    for obj in objects:
        for attribute in ("monitor", "_monitor"):
            found = getattr(obj, attribute, None)
            if found is not None and hasattr(found, "output_dir"):
                return found
        if obj is not None and hasattr(obj, "output_dir") and hasattr(obj, "on_event"):
            return obj
    return None


def _snapshot(monitor: Any, kl_threshold: float | None = None) -> Any:
    """A snapshot with history, replayed from ``monitor.output_dir``'s event log; None if none."""
    if monitor is None:
        return None
    from collector.cli import replay
    from rlmon.errors import ConfigError

    threshold = kl_threshold
    if threshold is None:
        threshold = float(monitor.collector_settings.get("--kl-threshold", 0.1))
    try:
        state = replay(Path(monitor.output_dir), kl_threshold=threshold)
    except ConfigError as exc:
        log.warning("rlmon: nothing to report yet (%s)", exc)
        return None
    return state.snapshot(time.time(), with_history=True, finished=True)


class PlotManager:
    """Writes the seed's PNGs into ``output_dir`` (matplotlib optional: without it, nothing is
    written and one warning is logged). Each ``create_*`` call replays the event log once."""

    def __init__(self, output_dir: str | Path = Path("./outputs"),
                 style: str = "seaborn-v0_8-whitegrid", dpi: int = 150) -> None:
        self.output_dir = Path(output_dir)
        self.style = style
        self.dpi = dpi
        self.written: list[Path] = []

    def _write(self, names: list[str], snapshot: Any) -> list[Path]:
        if snapshot is None:
            return []
        from exporters.atomic import atomic_write_bytes
        from exporters.plots import render_pngs

        pngs = render_pngs(snapshot, dpi=self.dpi, style=self.style, names=names)
        if pngs:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = [atomic_write_bytes(self.output_dir / name, data) for name, data in pngs.items()]
        self.written.extend(paths)
        return paths

    def create_loss_plot(self, metrics_store: Any) -> None:
        """``loss_curves.png``: policy, value and total losses per step."""
        self._write(["loss_curves.png"], _snapshot(_monitor_of(metrics_store)))

    def create_reward_plot(self, metrics_store: Any) -> None:
        """``rewards.png``: the reward with its trend."""
        self._write(["rewards.png"], _snapshot(_monitor_of(metrics_store)))

    def create_kl_plot(self, metrics_store: Any, kl_threshold: float = 0.1) -> None:
        """``kl_divergence.png`` with the warning (``kl_threshold``) and critical (2x) lines."""
        self._write(["kl_divergence.png"], _snapshot(_monitor_of(metrics_store), kl_threshold))

    def create_quality_plot(self, comparator: Any, analyzer: Any) -> None:
        """``quality_metrics.png``: sample similarity and the alerts."""
        self._write(["quality_metrics.png"], _snapshot(_monitor_of(analyzer, comparator)))

    def create_ppo_plot(self, ppo_tracker: Any) -> None:
        """``ppo_mechanics.png``: clip fraction, advantages, gradient norm, value loss."""
        self._write(["ppo_mechanics.png"], _snapshot(_monitor_of(ppo_tracker)))

    def create_all_plots(self, metrics_store: Any = None, comparator: Any = None,
                         analyzer: Any = None, ppo_tracker: Any = None,
                         kl_threshold: float | None = None) -> None:
        """Every plot the run has data for (one replay), the dashboard included."""
        from exporters.plots import PLOT_FILES

        monitor = _monitor_of(metrics_store, analyzer, comparator, ppo_tracker)
        self._write(list(PLOT_FILES), _snapshot(monitor, kl_threshold))

    def close_all(self) -> None:
        """Nothing stays open: every figure is cleared once rendered (kept for the seed's API)."""


class ReportGenerator:
    """Writes ``training_report.md`` and ``training_report.json`` (the seed's schema, extended)
    into ``output_dir``."""

    def __init__(self, output_dir: str | Path = Path("./outputs")) -> None:
        self.output_dir = Path(output_dir)

    def _snapshot(self, monitor: Any, analyzer: Any) -> Any:
        threshold = getattr(analyzer, "kl_threshold", None)
        return _snapshot(_monitor_of(monitor, analyzer), threshold)

    def generate_markdown_report(self, monitor: Any, comparator: Any = None, analyzer: Any = None,
                                 ppo_tracker: Any = None) -> Path | None:
        """Write ``training_report.md``; return its path (None when there is no event log)."""
        from exporters.reports import MARKDOWN_REPORT_NAME, write_markdown_report

        snapshot = self._snapshot(monitor, analyzer)
        if snapshot is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return write_markdown_report(snapshot, self.output_dir / MARKDOWN_REPORT_NAME)

    def generate_json_report(self, monitor: Any, comparator: Any = None, analyzer: Any = None,
                             ppo_tracker: Any = None) -> Path | None:
        """Write ``training_report.json``; return its path (None when there is no event log)."""
        from exporters.reports import JSON_REPORT_NAME, write_json_report

        snapshot = self._snapshot(monitor, analyzer)
        if snapshot is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return write_json_report(snapshot, self.output_dir / JSON_REPORT_NAME)

    def generate_all_reports(self, monitor: Any, comparator: Any = None, analyzer: Any = None,
                             ppo_tracker: Any = None) -> list[Path]:
        """Both reports from one replay; return the paths written."""
        from exporters.reports import write_final_reports

        snapshot = self._snapshot(monitor, analyzer)
        return [] if snapshot is None else write_final_reports(snapshot, self.output_dir)
