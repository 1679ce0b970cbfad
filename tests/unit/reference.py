"""Slow, obvious plain-Python references for the collector's kernels, store and aggregator.

Nothing here is fast or clever: lists, ``collections.deque``, the ``statistics`` module, sorted
lists and exact ``fractions.Fraction`` arithmetic. The tests compare the real code against these.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction


def ref_ema(values: list[float], alpha: float, ema: float = math.nan) -> float:
    """EMA after feeding ``values`` one by one; non-finite values are skipped, NaN until the first."""
    for x in values:
        if not math.isfinite(x):
            continue
        ema = x if math.isnan(ema) else ema + alpha * (x - ema)
    return ema


def ref_percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (NumPy's default) of an ascending, non-empty list, exactly."""
    pos = (len(sorted_values) - 1) * Fraction(q)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    a, b = Fraction(sorted_values[lo]), Fraction(sorted_values[hi])
    return float(a + (b - a) * (pos - lo))


def ref_slope(steps: list[int], values: list[float]) -> float:
    """Exact least-squares slope of ``values`` against ``steps`` (finite points only), as a float."""
    pts = [(Fraction(s), Fraction(v)) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(pts) < 2:
        return math.nan
    xm = sum(x for x, _ in pts) / len(pts)
    ym = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - xm) ** 2 for x, _ in pts)
    if sxx == 0:
        return math.nan
    return float(sum((x - xm) * (y - ym) for x, y in pts) / sxx)


def ref_window_stats(steps: list[int], values: list[float]) -> dict[str, float]:
    """Window statistics of the finite values, keyed like ``SeriesStats`` fields."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        nan = math.nan
        return dict(count=0, mean=nan, std=nan, min=nan, max=nan, median=nan,
                    p25=nan, p75=nan, p90=nan, slope=nan)
    return dict(
        count=len(finite), mean=float(sum(map(Fraction, finite)) / len(finite)),
        std=statistics.pstdev(finite),
        min=finite[0], max=finite[-1], median=ref_percentile(finite, 0.5),
        p25=ref_percentile(finite, 0.25), p75=ref_percentile(finite, 0.75),
        p90=ref_percentile(finite, 0.9), slope=ref_slope(steps, values),
    )


@dataclass
class RefSeries:
    """One series: a bounded deque of (step, value) and two running EMAs."""

    capacity: int
    points: deque = field(init=False)
    ema_short: float = math.nan
    ema_long: float = math.nan

    def __post_init__(self) -> None:
        self.points = deque(maxlen=self.capacity)


class RefStore:
    """What ``RingStore`` must hold, kept with deques."""

    def __init__(self, capacity: int, ema_short_span: int = 10, ema_long_span: int = 100) -> None:
        self.capacity = capacity
        self.alpha_short = 2 / (ema_short_span + 1)
        self.alpha_long = 2 / (ema_long_span + 1)
        self.series: list[RefSeries] = []

    def add_series(self) -> int:
        """Create a series; returns its id."""
        self.series.append(RefSeries(self.capacity))
        return len(self.series) - 1

    def append(self, sid: int, step: int, value: float) -> None:
        """Append one point."""
        s = self.series[sid]
        s.points.append((step, value))
        s.ema_short = ref_ema([value], self.alpha_short, s.ema_short)
        s.ema_long = ref_ema([value], self.alpha_long, s.ema_long)

    def append_block(self, sids: list[int], steps: list[int], rows: list[list[float]]) -> None:
        """Append ``rows[i][j]`` at ``steps[i]`` to ``sids[j]``, row by row."""
        for step, row in zip(steps, rows):
            for sid, value in zip(sids, row):
                self.append(sid, step, value)

    def history(self, sid: int, n: int | None = None) -> tuple[list[int], list[float]]:
        """Last ``n`` points (all when None), oldest first."""
        pts = list(self.series[sid].points)
        if n is not None:
            pts = pts[len(pts) - min(n, len(pts)):]
        return [p[0] for p in pts], [p[1] for p in pts]


class RefAggregator:
    """Naive cross-rank aggregator with unbounded memory and the same completion rules."""

    def __init__(self, world_size: int, max_pending_steps: int) -> None:
        self.world_size = world_size
        self.horizon = max_pending_steps
        self.values: dict[tuple[str, int], dict[int, float]] = {}
        self.finished: set[tuple[str, int]] = set()
        self.newest: dict[str, int] = {}
        self.out: list[tuple[str, int, float, float, float, int]] = []
        self.late = 0

    def add(self, metric: str, rank: int, step: int, value: float) -> None:
        """One report."""
        newest = self.newest.get(metric)
        if (metric, step) in self.finished or (newest is not None and step < newest - self.horizon):
            self.late += 1
            return
        self.values.setdefault((metric, step), {})[rank] = value
        if len(self.values[(metric, step)]) >= self.world_size:
            self.finish(metric, step)
        self.newest[metric] = step if newest is None else max(newest, step)
        for m, s in list(self.values):
            if m == metric and s < self.newest[metric] - self.horizon:
                self.finish(m, s)

    def finish(self, metric: str, step: int) -> None:
        """Emit one aggregate."""
        by_rank = self.values.pop((metric, step))
        finite = [v for v in by_rank.values() if math.isfinite(v)]
        stats = (statistics.fmean(finite), min(finite), max(finite)) if finite else (math.nan,) * 3
        self.out.append((metric, step, *stats, len(by_rank)))
        self.finished.add((metric, step))
