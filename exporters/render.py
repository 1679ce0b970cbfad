"""One entry point for the report files, meant to run in a forked child of the collector.

:func:`render_reports` reads a :class:`CollectorSnapshot` taken with history and writes:

* at the end of a run (``step=None``): every plot of :data:`exporters.plots.PLOT_FILES` the
  snapshot has data for (``final_dashboard.png`` included), ``monitoring_data.json`` and
  ``final_summary.html`` (with those plots embedded), in that order, so the page's links point
  at files that already exist;
* mid-run (``step=N``): ``dashboard_step_N.png`` and ``summary_step_N.html``.

Every file is rendered in memory and renamed into place (:mod:`exporters.atomic`). The function
opens no socket and touches no global state but matplotlib's ``rcParams`` (restored after each
plot), so it is safe in a child process forked from the collector. Without matplotlib the PNGs are
left out (one warning per process) and the HTML and JSON are still written. An ``OSError`` while
writing propagates; a plot that fails to draw is logged and left out.
"""

from __future__ import annotations

import time
from pathlib import Path

from collector.snapshot import CollectorSnapshot
from exporters import plots
from exporters.atomic import atomic_write_bytes
from exporters.html_report import FINAL_NAME, step_file_name, write_html_report
from exporters.monitoring_data import FILE_NAME as DATA_NAME
from exporters.monitoring_data import write_monitoring_data
from exporters.reports import JSON_REPORT_NAME, MARKDOWN_REPORT_NAME

LINKED_FILES = (DATA_NAME, MARKDOWN_REPORT_NAME, JSON_REPORT_NAME, "alerts.jsonl")
"""Files the final page links to when they exist in the output directory."""


def render_reports(snapshot: CollectorSnapshot, out_dir: str | Path, step: int | None = None, *,
                   dpi: int = plots.DEFAULT_DPI, generated_at: float | None = None) -> list[Path]:
    """Write the final report files (``step=None``) or step ``step``'s; return the paths written.

    ``out_dir`` is created if missing. ``generated_at`` (Unix seconds, default now) is stamped in
    the HTML and JSON. See the module docstring for the files and the failure behaviour.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    when = time.time() if generated_at is None else generated_at
    if step is None:
        return _final(snapshot, directory, dpi, when)
    return _at_step(snapshot, directory, int(step), dpi, when)


def _final(snapshot: CollectorSnapshot, directory: Path, dpi: int, when: float) -> list[Path]:
    images = plots.render_pngs(snapshot, dpi=dpi)
    written = [atomic_write_bytes(directory / name, data) for name, data in images.items()]
    written.append(write_monitoring_data(snapshot, directory / DATA_NAME, generated_at=when))
    links = [name for name in LINKED_FILES if (directory / name).exists()]
    written.append(write_html_report(snapshot, directory / FINAL_NAME, images=images,
                                     links=links, generated_at=when))
    return written


def _at_step(snapshot: CollectorSnapshot, directory: Path, step: int, dpi: int,
             when: float) -> list[Path]:
    name = f"dashboard_step_{step}.png"
    dashboard = plots.dashboard_png(snapshot, step=step, dpi=dpi)
    written = [] if dashboard is None else [atomic_write_bytes(directory / name, dashboard)]
    images = {} if dashboard is None else {name: dashboard}
    written.append(write_html_report(snapshot, directory / step_file_name(step), images=images,
                                     step=step, generated_at=when))
    return written
