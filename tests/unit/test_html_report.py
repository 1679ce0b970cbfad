"""The self-contained HTML summary: sections, embedded plots, no network references, escaping."""

from __future__ import annotations

import base64
import dataclasses
import re
from html.parser import HTMLParser
from types import MappingProxyType

import numpy as np
import pytest

from collector.snapshot import Alert, CollectorSnapshot, SampleRecord
from exporters.html_report import (FINAL_NAME, PLOT_CAPTIONS, render_html, step_file_name,
                                   write_html_report)
from exporters.reports import trend_arrow
from snapshot_factory import (T0, grpo_collector_snapshot, make_metric, make_snapshot,
                              with_rank_history)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
HOSTILE = "<script>alert('x')</script>"


class Collect(HTMLParser):
    """Every tag with its attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Collect:
    """The page parsed by the standard library's HTML parser."""
    parser = Collect()
    parser.feed(page)
    parser.close()
    return parser


def hostile_snapshot() -> CollectorSnapshot:
    """A snapshot whose every user-supplied string tries to inject markup."""
    base = with_rank_history(make_snapshot(stop=True))
    steps = np.arange(10)
    metrics = dict(base.metrics)
    metrics[HOSTILE] = make_metric(HOSTILE, np.ones((2, 10)), steps)
    alert = Alert(5, "WARNING", "<b>TYPE</b>", HOSTILE, 1.0, 0.5, 'msg "quoted" & <i>it</i>',
                  T0 + 5, rank=1)
    stop = dataclasses.replace(base.stop, reason="<img src=x onerror=alert(1)>",
                               source="<script>src</script>")
    sample = SampleRecord(9, 0, "<prompt onload=x>", "</pre><script>r</script>", 1.0)
    rank = dataclasses.replace(base.ranks[0], host="<host>")
    return dataclasses.replace(
        base, run_id="<run id='1'>", metrics=MappingProxyType(metrics), alerts=(alert,),
        alert_counts=MappingProxyType({("<b>TYPE</b>", "WARNING"): 1}), stop=stop,
        recent_samples=(sample,), ranks=MappingProxyType({**base.ranks, 0: rank}))


def test_final_page_has_every_section_and_embeds_the_plots():
    """Summary, dashboard, statistics, alerts, ranks, samples, plots and health are all there."""
    images = {"final_dashboard.png": PNG, "rewards.png": PNG, "kl_divergence.png": PNG,
              "unrelated.png": PNG}
    page = render_html(with_rank_history(make_snapshot(stop=True)), images=images,
                       generated_at=T0 + 200)
    ids = {attrs.get("id") for tag, attrs in parse(page).tags if tag == "section"}
    assert ids == {"summary", "dashboard", "statistics", "alerts", "ranks", "samples", "plots",
                   "health"}
    sources = [attrs["src"] for tag, attrs in parse(page).tags if tag == "img"]
    assert len(sources) == 3  # the dashboard and two captioned plots; unknown names ignored
    assert all(src == "data:image/png;base64," + base64.b64encode(PNG).decode() for src in sources)
    assert "Stopped at step 32" in page and "KL divergence above 2x threshold" in page


def test_page_references_nothing_on_the_network():
    """No src/href/url() points anywhere but data URIs and relative file names."""
    page = render_html(grpo_collector_snapshot(), images={"final_dashboard.png": PNG},
                       links=["monitoring_data.json", "training_report.md"])
    assert "http://" not in page and "https://" not in page and "//" not in re.sub(
        r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).replace("<!DOCTYPE", "")
    for tag, attrs in parse(page).tags:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith("data:image/png;base64,") or \
                    re.fullmatch(r"[\w.-]+", attrs[name]), (tag, attrs)
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_every_user_string_is_escaped():
    """Run id, metric names, alert text, stop reason, host, prompts and responses are escaped."""
    page = render_html(hostile_snapshot())
    tags = {tag for tag, _ in parse(page).tags}
    assert "script" not in tags and "img" not in tags and "b" not in tags and "i" not in tags
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;run id=&#x27;1&#x27;&gt;" in page and "&lt;host&gt;" in page
    assert "msg &quot;quoted&quot; &amp; &lt;i&gt;it&lt;/i&gt;" in page
    text = "".join(parse(page).text)
    assert HOSTILE in text and "</pre><script>r</script>" in text


def test_statistics_rows_use_the_reports_trend_rule():
    """Each metric row carries the Markdown report's trend arrow and the seed's statistics."""
    snap = make_snapshot()
    page = render_html(snap)
    for name, metric in snap.metrics.items():
        pattern = rf"<tr><td class=\"l\" title=\"\d+ points\"><code>{re.escape(name)}</code></td>(.*?)</tr>"
        row = re.search(pattern, page).group(1)
        assert trend_arrow(metric.window, metric.steps) in row
        assert row.count("<td") == 12


def test_step_page_is_titled_with_its_step_and_embeds_its_dashboard():
    """summary_step_N.html shows step N and the dashboard_step_N.png it was given."""
    page = render_html(make_snapshot(), step=25, images={"dashboard_step_25.png": PNG,
                                                         "final_dashboard.png": b"other"})
    assert "Training summary · step 25" in page
    assert page.count("data:image/png;base64,") == 1
    assert base64.b64encode(PNG).decode() in page
    assert step_file_name(25) == "summary_step_25.html"


def test_without_plots_the_page_says_how_to_get_them():
    """No images (matplotlib missing): the dashboard section names the extra to install."""
    page = render_html(make_snapshot())
    assert 'pip install &quot;rlmon[plots]&quot;' in page
    assert "id=\"plots\"" not in page


def test_empty_snapshot_renders(tmp_path):
    """A snapshot with no metric, rank, alert or sample still gives a valid page."""
    empty = CollectorSnapshot(run_id="r", started_at=T0, taken_at=T0, world_size=0,
                              kl_threshold=0.1)
    path = write_html_report(empty, tmp_path / FINAL_NAME)
    page = path.read_text(encoding="utf-8")
    assert "No metrics were logged." in page and "No rank has connected." in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_rank_table_shows_progress_and_step_time():
    """The per-rank table reports how far behind each rank is and its mean span time."""
    snap = grpo_collector_snapshot()
    page = render_html(snap)
    section = page[page.index('id="ranks"'):page.index('id="samples"')]
    assert section.count("<tr>") == 1 + len(snap.ranks)
    assert "×1.00" in section  # the fastest rank


@pytest.mark.parametrize("captioned", sorted(PLOT_CAPTIONS))
def test_each_captioned_plot_gets_a_figure(captioned):
    """Every plot named in PLOT_CAPTIONS is embedded with its caption."""
    page = render_html(make_snapshot(), images={captioned: PNG})
    assert PLOT_CAPTIONS[captioned] in page and page.count("<figure>") == 1
