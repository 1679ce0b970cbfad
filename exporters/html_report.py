"""``final_summary.html`` and ``summary_step_N.html``: one self-contained page per report.

The page needs nothing but itself: the CSS is inline, every plot is a ``data:image/png;base64``
URI, and it references no URL (links, if any, are relative file names such as
``monitoring_data.json``). Every string that came from a run — run id, metric names, hosts, alert
messages, prompts, responses, stop reasons — goes through :func:`html.escape`.

Sections, in order: run summary (status and stop state, run id, world size, steps, duration, alert
counts), the dashboard, the statistics table (mean, std, min, max, median, p25/p75/p90, EMAs, last
value and the Markdown report's trend arrow, see :func:`exporters.reports.trend_arrow`), recent
alerts with details and counts per type, the per-rank table (progress, step time, drops), recent
samples, sample comparisons, the other plots, collector health and links to the other files.

Pure text generation: no matplotlib (the caller passes the PNG bytes it rendered), no I/O beyond
the atomic write in :func:`write_html_report`.
"""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from collector.snapshot import CollectorSnapshot, MetricSnapshot, RankSnapshot
from exporters.atomic import atomic_write_text
from exporters.reports import (SEVERITIES, _duration, _iso, _num, alert_totals,
                               sample_comparisons, total_iterations, trend_arrow)

FINAL_NAME = "final_summary.html"
"""File name of the end-of-run page (the GRPO seed's)."""

INSTALL_HINT = 'pip install "rlmon[plots]"'
"""What the page tells a reader without plots to run (kept in step with exporters.plots)."""

RECENT_ALERTS = 25
"""How many of the most recent alerts the page lists, newest first."""

RECENT_SAMPLES = 8
"""How many of the most recent samples the page shows."""

SAMPLE_TEXT_LIMIT = 400
"""Prompts and responses longer than this many characters are cut, with an ellipsis."""

PLOT_CAPTIONS = {
    "loss_curves.png": "Losses",
    "rewards.png": "Reward progression with trend",
    "kl_divergence.png": "KL divergence with warning/critical thresholds",
    "quality_metrics.png": "Generation quality and alerts",
    "ppo_mechanics.png": "PPO mechanics",
    "reward_history.png": "Reward history per reward function",
    "reward_distributions.png": "Reward distributions",
    "reward_statistics.png": "Reward statistics",
}
"""Captions of the plots shown in the page's Plots section, in display order."""

_CSS = """
:root{--fg:#1d2330;--muted:#5b6474;--line:#dfe3ea;--bg:#f6f7f9;--card:#fff;--info:#1f77b4;
--warn:#c77700;--crit:#c62828;--ok:#2e7d32}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1360px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;padding-bottom:4px;
border-bottom:2px solid var(--line)}h3{font-size:15px;margin:18px 0 8px}
.sub{color:var(--muted);margin:0 0 12px}code{font:12.5px ui-monospace,Menlo,Consolas,monospace}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;
min-width:150px}.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.04em}.card .v{font-size:20px;font-weight:600}
.banner{border-radius:8px;padding:10px 14px;margin:10px 0;border:1px solid var(--line);
background:var(--card)}.banner.stop{border-color:var(--crit);background:#fdecea}
.banner.ok{border-color:var(--ok);background:#edf7ee}
table{border-collapse:collapse;background:var(--card);border:1px solid var(--line);
width:100%;margin:6px 0;font-size:13px}th,td{padding:4px 7px;border-bottom:1px solid var(--line);
text-align:right;vertical-align:top}td.n{width:1%;white-space:nowrap}
table.stats{font-size:12px}table.stats td{white-space:nowrap;padding:4px 5px}
table.stats td.trend{text-align:center}th{background:#eef1f5;font-weight:600;position:sticky;top:0}
td.l,th.l{text-align:left}tbody tr:nth-child(even){background:#fafbfc}
table.kv{width:auto}table.kv th{text-align:left;background:none;position:static}
.wrap{overflow-x:auto}.badge{display:inline-block;border-radius:10px;padding:1px 8px;
font-size:12px;font-weight:600;color:#fff}.INFO{background:var(--info)}
.WARNING{background:var(--warn)}.CRITICAL{background:var(--crit)}.other{background:#777}
.trend{font-size:16px}.muted{color:var(--muted)}
pre.t{margin:0;white-space:pre-wrap;word-break:break-word;font:12px ui-monospace,Menlo,
Consolas,monospace;max-width:520px;text-align:left}
figure{margin:12px 0;background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:10px}figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:var(--muted);font-size:13px;margin-top:6px;text-align:center}
footer{color:var(--muted);font-size:12px;margin-top:36px}
"""


def step_file_name(step: int) -> str:
    """``summary_step_N.html``, the page written at step ``step``."""
    return f"summary_step_{int(step)}.html"


def render_html(snapshot: CollectorSnapshot, *, images: Mapping[str, bytes] | None = None,
                step: int | None = None, links: Sequence[str] = (),
                generated_at: float | None = None) -> str:
    """The page as text.

    ``images`` maps file names to PNG bytes: the dashboard (``final_dashboard.png`` or
    ``dashboard_step_N.png``) is shown near the top, the names in :data:`PLOT_CAPTIONS` in the
    Plots section; other names are ignored. ``step`` titles a mid-run page. ``links`` are file
    names relative to the page (shown only as given, escaped). ``generated_at`` is Unix seconds,
    default now.
    """
    images = dict(images or {})
    when = time.time() if generated_at is None else generated_at
    title = f"Training summary · step {step}" if step is not None else "Training summary"
    body = [_header(snapshot, title, when), _summary(snapshot),
            _dashboard(images, step), _statistics(snapshot), _alerts(snapshot),
            _ranks(snapshot), _samples(snapshot), _plots(images), _health(snapshot, links),
            f"<footer>Written by rlmon at {_e(_iso(when) or '')}. This page is self-contained: "
            "plots are embedded, nothing is loaded from the network.</footer>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)} · {_e(snapshot.run_id)}</title><style>{_CSS}</style></head>"
            "<body><main>\n" + "\n".join(part for part in body if part) + "\n</main></body></html>\n")


def write_html_report(snapshot: CollectorSnapshot, path: str | Path, *,
                      images: Mapping[str, bytes] | None = None, step: int | None = None,
                      links: Sequence[str] = (), generated_at: float | None = None) -> Path:
    """Write :func:`render_html`'s page to ``path`` atomically; return the path. The parent
    directory must exist; on failure the previous file is left as it was."""
    return atomic_write_text(path, render_html(snapshot, images=images, step=step, links=links,
                                               generated_at=generated_at))


# --- sections -------------------------------------------------------------------------------------

def _header(snap: CollectorSnapshot, title: str, when: float) -> str:
    state = "finished" if snap.finished else "running"
    return (f"<header><h1>{_e(title)}</h1><p class=\"sub\">run <code>{_e(snap.run_id)}</code> · "
            f"{state} · snapshot {_e(_iso(snap.taken_at) or 'n/a')}</p></header>")


def _summary(snap: CollectorSnapshot) -> str:
    totals = alert_totals(snap)
    cards = [("Steps", str(total_iterations(snap))), ("World size", str(snap.world_size)),
             ("Duration", _duration(snap.taken_at - snap.started_at)),
             ("Warnings", str(totals.get("WARNING", 0))),
             ("Critical", str(totals.get("CRITICAL", 0)))]
    card_html = "".join(f"<div class=\"card\"><div class=\"k\">{_e(k)}</div>"
                        f"<div class=\"v\">{_e(v)}</div></div>" for k, v in cards)
    rows = [("Run ID", f"<code>{_e(snap.run_id)}</code>"),
            ("Started", _e(_iso(snap.started_at) or "n/a")),
            ("Snapshot taken", _e(_iso(snap.taken_at) or "n/a")),
            ("Finished", "yes" if snap.finished else "no (still running)"),
            ("KL threshold", f"{_num(snap.kl_threshold)} (critical at "
                             f"{_num(2 * snap.kl_threshold)})")]
    return ("<section id=\"summary\"><h2>Run summary</h2>" + _stop_banner(snap)
            + f"<div class=\"cards\">{card_html}</div>" + _kv_table(rows) + "</section>")


def _stop_banner(snap: CollectorSnapshot) -> str:
    stop = snap.stop
    if stop is None:
        return "<div class=\"banner ok\"><strong>No stop decided.</strong></div>"
    acked = ", ".join(str(r) for r in stop.acked_ranks) or "none yet"
    return (f"<div class=\"banner stop\"><strong>Stopped at step {stop.stop_at_step}</strong> "
            f"{_badge(stop.severity)} — {_e(stop.reason)}<br><span class=\"muted\">source "
            f"<code>{_e(stop.source)}</code> · generation {stop.generation} · decided "
            f"{_e(_iso(stop.decided_at) or 'n/a')} · acknowledged by ranks {_e(acked)}"
            "</span></div>")


def _dashboard(images: Mapping[str, bytes], step: int | None) -> str:
    name = "final_dashboard.png" if step is None else f"dashboard_step_{int(step)}.png"
    data = images.get(name)
    if data is None:
        return ("<section id=\"dashboard\"><h2>Dashboard</h2><p class=\"muted\">No dashboard: "
                "no metric history yet, or matplotlib is not installed "
                f"(<code>{_e(INSTALL_HINT)}</code>).</p></section>")
    caption = "Overview" if step is None else f"Overview at step {int(step)}"
    return ("<section id=\"dashboard\"><h2>Dashboard</h2>" + _figure(name, data, caption)
            + "</section>")


def _statistics(snap: CollectorSnapshot) -> str:
    metrics = sorted(snap.metrics.values(), key=lambda m: m.name)
    if not metrics:
        return "<section id=\"statistics\"><h2>Statistics</h2><p>No metrics were logged.</p></section>"
    head = ("<tr><th class=\"l\">Metric</th><th>Trend</th><th>Last</th><th>Mean</th><th>Std</th>"
            "<th>Min</th><th>Max</th><th>Median</th><th>P25</th><th>P75</th><th>P90</th>"
            "<th>EMA short</th><th>EMA long</th></tr>")
    rows = "".join(_stat_row(m) for m in metrics)
    return ("<section id=\"statistics\"><h2>Statistics</h2><p class=\"sub\">Over each metric's "
            "cross-rank mean series. Trend: ↑/↓ when the fitted change spans at least one "
            "standard deviation and the slope is significant; hover for the slope.</p>"
            f"<div class=\"wrap\"><table class=\"stats\"><thead>{head}</thead><tbody>{rows}"
            "</tbody></table></div></section>")


def _stat_row(metric: MetricSnapshot) -> str:
    s = metric.window
    cells = [s.last, s.mean, s.std, s.min, s.max, s.median, s.p25, s.p75, s.p90, s.ema_short,
             s.ema_long]
    slope = f"slope {_num(s.slope)} per step"
    return (f"<tr><td class=\"l\" title=\"{s.count} points\"><code>{_e(metric.name)}</code></td>"
            f"<td class=\"trend\" title=\"{_e(slope)}\">{trend_arrow(s, metric.steps)}</td>"
            + "".join(f"<td>{_e(_num(v))}</td>" for v in cells) + "</tr>")


def _alerts(snap: CollectorSnapshot) -> str:
    totals = alert_totals(snap)
    counts = " ".join(f"{_badge(sev)} {totals.get(sev, 0)}" for sev in SEVERITIES)
    parts = [f"<section id=\"alerts\"><h2>Alerts</h2><p>{counts}</p>"]
    if snap.alert_counts:
        by_type = "".join(f"<tr><td class=\"l\">{_e(kind)}</td><td class=\"l\">{_badge(sev)}</td>"
                          f"<td>{int(n)}</td></tr>"
                          for (kind, sev), n in sorted(snap.alert_counts.items()))
        parts.append("<h3>Counts by type</h3><table class=\"kv\"><thead><tr><th class=\"l\">Type"
                     f"</th><th class=\"l\">Severity</th><th>Count</th></tr></thead><tbody>"
                     f"{by_type}</tbody></table>")
    recent = list(snap.alerts[-RECENT_ALERTS:])[::-1]
    if not recent:
        parts.append("<p class=\"muted\">No alerts were raised.</p>")
    else:
        parts.append(f"<h3>Most recent {len(recent)}, newest first</h3><div class=\"wrap\">"
                     "<table><thead><tr><th>Step</th><th class=\"l\">Severity</th><th class=\"l\">"
                     "Type</th><th class=\"l\">Metric</th><th>Value</th><th>Threshold</th>"
                     "<th>Rank</th><th class=\"l\">Time</th><th class=\"l\">Message</th></tr>"
                     "</thead><tbody>" + "".join(_alert_row(a) for a in recent)
                     + "</tbody></table></div>")
    return "".join(parts) + "</section>"


def _alert_row(alert) -> str:
    rank = str(alert.rank) if alert.rank >= 0 else "all"
    return (f"<tr><td class=\"n\">{alert.step}</td><td class=\"l\">{_badge(alert.severity)}</td>"
            f"<td class=\"l\">{_e(alert.type)}</td><td class=\"l\"><code>{_e(alert.metric)}</code>"
            f"</td><td>{_e(_num(alert.value))}</td><td>{_e(_num(alert.threshold))}</td>"
            f"<td>{rank}</td><td class=\"n\" title=\"{_e(_iso(alert.time) or '')}\">"
            f"{_e(_clock(alert.time))}</td>"
            f"<td class=\"l\">{_e(alert.message)}</td></tr>")


def _ranks(snap: CollectorSnapshot) -> str:
    ranks = sorted(snap.ranks.values(), key=lambda r: r.rank)
    if not ranks:
        return "<section id=\"ranks\"><h2>Ranks</h2><p>No rank has connected.</p></section>"
    furthest = max(r.last_step for r in ranks)
    step_time = _mean_step_time(snap)
    fastest = min(step_time.values(), default=math.nan)
    head = ("<tr><th>Rank</th><th class=\"l\">Host</th><th>Local rank</th><th>PID</th>"
            "<th>Last step</th><th>Behind</th><th>Last seen</th><th>Step time (s)</th>"
            "<th>vs fastest</th><th>Batches</th><th>Values</th><th class=\"l\">Dropped</th>"
            "<th class=\"l\">Closed</th></tr>")
    rows = "".join(_rank_row(snap, r, furthest, step_time.get(r.rank, math.nan), fastest)
                   for r in ranks)
    return ("<section id=\"ranks\"><h2>Ranks</h2><p class=\"sub\">Step time is the mean over "
            "steps of the <code>span/*</code> durations each rank logged, summed.</p>"
            f"<div class=\"wrap\"><table><thead>{head}</thead><tbody>{rows}</tbody></table></div>"
            "</section>")


def _rank_row(snap: CollectorSnapshot, r: RankSnapshot, furthest: int, seconds: float,
              fastest: float) -> str:
    seen = _duration(snap.taken_at - r.last_seen) + " ago" if r.last_seen > 0 else "never"
    ratio = f"×{seconds / fastest:.2f}" if math.isfinite(seconds) and fastest > 0 else "–"
    dropped = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(r.dropped_by_reason.items())) or "none"
    return (f"<tr><td>{r.rank}</td><td class=\"l\">{_e(r.host)}</td><td>{r.local_rank}</td>"
            f"<td>{r.pid}</td><td>{r.last_step}</td><td>{furthest - r.last_step}</td>"
            f"<td>{_e(seen)}</td><td>{_e(_num(seconds))}</td><td>{ratio}</td>"
            f"<td>{r.batches_received}</td><td>{r.scalars_received}</td>"
            f"<td class=\"l\">{dropped}</td><td class=\"l\">{'yes' if r.closed else 'no'}</td></tr>")


def _mean_step_time(snap: CollectorSnapshot) -> dict[int, float]:
    """``{rank: seconds}``: the sum over ``span/*`` metrics of each rank's mean duration."""
    totals: dict[int, float] = {}
    for name, metric in snap.metrics.items():
        if not name.startswith("span/"):
            continue
        for rank, (_steps, values) in metric.history_by_rank.items():
            finite = np.asarray(values, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                totals[rank] = totals.get(rank, 0.0) + float(finite.mean())
    return totals


def _samples(snap: CollectorSnapshot) -> str:
    comp = sample_comparisons(snap)
    similarity = comp.get("avg_similarity")
    rows = [("Comparisons", _e(comp.get("num_comparisons"))),
            ("Average similarity", _e(_num(similarity)) if isinstance(similarity, (int, float))
             else "n/a"),
            ("Degraded samples", _e(comp.get("degraded_count"))),
            ("Catastrophic forgetting", "yes" if comp.get("catastrophic_forgetting") else "no")]
    parts = ["<section id=\"samples\"><h2>Recent samples</h2>"]
    recent = snap.recent_samples[-RECENT_SAMPLES:]
    if recent:
        parts.append("<div class=\"wrap\"><table><thead><tr><th>Step</th><th>Rank</th>"
                     "<th class=\"l\">Prompt</th><th class=\"l\">Response</th><th>Reward</th>"
                     "</tr></thead><tbody>")
        parts += [f"<tr><td class=\"n\">{s.step}</td><td class=\"n\">{s.rank}</td>"
                  f"<td class=\"l\"><pre class=\"t\">"
                  f"{_e(_cut(s.prompt))}</pre></td><td class=\"l\"><pre class=\"t\">"
                  f"{_e(_cut(s.response))}</pre></td><td>{_e(_num(s.reward))}</td></tr>"
                  for s in recent]
        parts.append("</tbody></table></div>")
    else:
        parts.append("<p class=\"muted\">No samples were logged.</p>")
    parts.append("<h3>Sample comparisons</h3>" + _kv_table(rows) + "</section>")
    return "".join(parts)


def _plots(images: Mapping[str, bytes]) -> str:
    shown = [(name, caption) for name, caption in PLOT_CAPTIONS.items() if name in images]
    if not shown:
        return ""
    figures = "".join(_figure(name, images[name], caption) for name, caption in shown)
    return f"<section id=\"plots\"><h2>Plots</h2>{figures}</section>"


def _health(snap: CollectorSnapshot, links: Iterable[str]) -> str:
    def counts(mapping: Mapping[str, int]) -> str:
        return ", ".join(f"{_e(k)}: {v}" for k, v in sorted(mapping.items())) or "none"
    rows = [("Frames received", counts(snap.frames_received_by_kind)),
            ("Frames rejected", counts(snap.frames_rejected_by_reason)),
            ("Values flagged", counts(snap.values_flagged_by_reason)),
            ("Series stored", f"{snap.series_count} (capacity {snap.series_capacity} points "
                              "each)")]
    files = "".join(f"<li><a href=\"{_e(name)}\">{_e(name)}</a></li>" for name in links)
    listing = f"<h3>Files</h3><ul>{files}</ul>" if files else ""
    return f"<section id=\"health\"><h2>Collector health</h2>{_kv_table(rows)}{listing}</section>"


# --- helpers --------------------------------------------------------------------------------------

def _figure(name: str, data: bytes, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    label = caption or name
    return (f"<figure><img src=\"data:image/png;base64,{encoded}\" alt=\"{_e(label)}\">"
            f"<figcaption>{_e(label)} <span class=\"muted\">({_e(name)})</span></figcaption>"
            "</figure>")


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table; values are already HTML (escaped by the caller)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td class=\"l\">{v}</td></tr>" for k, v in rows)
    return f"<table class=\"kv\"><tbody>{body}</tbody></table>"


def _badge(severity: str) -> str:
    kind = severity if severity in SEVERITIES else "other"
    return f"<span class=\"badge {kind}\">{_e(severity)}</span>"


def _clock(unix_seconds: float) -> str:
    """``HH:MM:SS`` local time (the full ISO time goes in the cell's tooltip)."""
    iso = _iso(unix_seconds)
    return iso[11:19] if iso else "n/a"


def _cut(text: str) -> str:
    text = str(text)
    return text if len(text) <= SAMPLE_TEXT_LIMIT else text[: SAMPLE_TEXT_LIMIT - 1] + "…"


def _e(value: object) -> str:
    """Text safe in HTML content and in quoted attribute values."""
    return html.escape(str(value), quote=True)
