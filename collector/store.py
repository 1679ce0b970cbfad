"""Bounded ring buffers holding every (metric, rank) series the collector has seen.

:class:`RingStore` is owned by the receive loop: it is not thread-safe, and exporters read the
snapshots built from it, never the store. A series is named by ``(metric, rank)``; rank -1 is the
cross-rank mean series (the caller may keep others, e.g. -2/-3 for min/max). Each series keeps its
last ``capacity`` points; older points are overwritten in place (ring buffers indexed modulo their
width, never shifted). The ring arithmetic is in :mod:`collector.kernels`.

Memory: the arrays grow lazily. Rows double as series are created (up to ``max_series``); the ring
width starts at 256 points, grows fourfold while it stays within an eighth of ``capacity``, then
jumps to ``capacity``. Each point costs 16 bytes (float64 value + int64 step) once its row is
allocated, so a full store costs ``16 * capacity`` bytes per series (160 kB by default).

Widening copies every series into new arrays, and the first write to fresh memory is what costs
(page faults: 1.4 s for 276 MB on the development VM, against 77 ms into memory already touched).
So once a series is half way to the current width (or the rows are half used), a background
thread (:class:`_SpareRings`) allocates the next arrays and touches the part the copy will write,
with the GIL released; the receive loop then only copies. The rest of the new arrays is touched
as the rings fill, as before.

Errors: :class:`SeriesLimitError` when a new series would pass ``max_series``; ``IndexError`` for
an unknown series id; ``TypeError``/``ValueError`` for arrays of the wrong kind or shape.
"""

from __future__ import annotations

import operator
import threading
from typing import NamedTuple

import numpy as np

from collector import kernels
from collector.snapshot import SeriesStats

_FIRST_ROWS = 64
_FIRST_WIDTH = 256
_WIDTH_GROWTH = 4
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class _Rings(NamedTuple):
    """The store's arrays, in the argument order of the ring kernels (:mod:`collector.kernels`)."""

    values: np.ndarray
    steps: np.ndarray
    heads: np.ndarray
    counts: np.ndarray
    ema_short: np.ndarray
    ema_long: np.ndarray

    def rows(self, n: int) -> _Rings:
        """Views of the first ``n`` series (what the kernels get, so they reject other ids)."""
        return _Rings(*(a[:n] for a in self))


class SeriesLimitError(Exception):
    """A new series would pass the store's ``max_series``; carries ``metric``, ``rank``, ``limit``."""

    def __init__(self, metric: str, rank: int, limit: int) -> None:
        super().__init__(f"cannot add series ({metric!r}, rank {rank}): limit of {limit} reached")
        self.metric = metric
        self.rank = rank
        self.limit = limit


class RingStore:
    """Ring buffers of the last ``capacity`` (step, value) points of up to ``max_series`` series.

    Values are float64 in the metric's own units; steps are int64 training steps. NaN and Inf are
    stored as given but never enter the EMAs or the window statistics. EMAs use
    ``alpha = 2 / (span + 1)`` and start at the first finite value. Not thread-safe: one owner.
    """

    def __init__(self, capacity: int = 10_000, max_series: int = 4_096,
                 ema_short_span: int = 10, ema_long_span: int = 100) -> None:
        self._capacity = _positive(capacity, "capacity")
        self._max_series = _positive(max_series, "max_series")
        self._alpha_short = 2.0 / (_positive(ema_short_span, "ema_short_span") + 1)
        self._alpha_long = 2.0 / (_positive(ema_long_span, "ema_long_span") + 1)
        self._ids: dict[tuple[str, int], int] = {}
        self._keys: list[tuple[str, int]] = []
        rows, width = min(self._max_series, _FIRST_ROWS), min(self._capacity, _FIRST_WIDTH)
        self._arrays = _allocate(rows, width)
        self._live_rings: _Rings | None = None
        self._spare = _SpareRings()
        self._one_id = np.zeros(1, np.int64)
        self._one_step = np.zeros(1, np.int64)
        self._one_value = np.zeros((1, 1), np.float64)

    @property
    def _live(self) -> _Rings:
        """Views of the live series' rows (what the kernels get, so they reject other ids);
        made again only after a series was created or the arrays moved."""
        if self._live_rings is None:
            self._live_rings = self._arrays.rows(len(self._keys))
        return self._live_rings

    @property
    def capacity(self) -> int:
        """Most points kept per series; older points are overwritten."""
        return self._capacity

    @property
    def max_series(self) -> int:
        """Most series the store accepts before raising :class:`SeriesLimitError`."""
        return self._max_series

    @property
    def series_count(self) -> int:
        """Number of series created so far."""
        return len(self._keys)

    def series_id(self, metric: str, rank: int) -> int:
        """Id of series ``(metric, rank)``, creating it on first use.

        Raises :class:`SeriesLimitError` when creating it would pass ``max_series`` (the store is
        unchanged), ``TypeError`` when ``metric`` is not a str or ``rank`` not an int.
        """
        sid = self._ids.get((metric, rank))
        if sid is None:
            sid = self._create(metric, rank)
        return sid

    def find(self, metric: str, rank: int) -> int | None:
        """Id of series ``(metric, rank)``, or None when it does not exist (never creates one)."""
        return self._ids.get((metric, rank))

    def keys(self) -> list[tuple[str, int]]:
        """Every ``(metric, rank)`` in id order (the list index is the series id); a fresh list."""
        return list(self._keys)

    def count(self, series_id: int) -> int:
        """Points currently held by the series (at most ``capacity``); IndexError if unknown."""
        return int(self._arrays.counts[self._check_id(series_id)])

    def append(self, series_id: int, step: int, value: float) -> None:
        """Append one point (slow path, a few µs: a one-by-one block).

        IndexError for an unknown id; TypeError/OverflowError for a step that is not an integer in
        the int64 range; TypeError/ValueError for a value that is not a float.
        """
        sid = self._check_id(series_id)
        self._one_step[0] = _as_step(step)
        self._one_value[0, 0] = float(value)
        self._one_id[0] = sid
        self._fit_width(int(self._arrays.counts[sid]) + 1)
        kernels.ring_append_block(*self._live, self._alpha_short, self._alpha_long,
                                  self._one_id, self._one_step, self._one_value)

    def append_block(self, series_ids: np.ndarray, steps: np.ndarray, values: np.ndarray) -> None:
        """Append ``(steps[i], values[i, j])`` to series ``series_ids[j]`` for every row ``i``, in
        row order.

        ``series_ids`` int64 ``(k,)``, ``steps`` int64 ``(n,)``, ``values`` float64 ``(n, k)``
        (other integer/float dtypes that convert safely are accepted and copied). One kernel call.
        Each id may appear once per block. Appends nothing and raises IndexError for an unknown
        id, ValueError for a repeated id or mismatched shapes, TypeError for a bad dtype.
        """
        ids = _as_array(series_ids, np.int64, 1, "series_ids")
        steps = _as_array(steps, np.int64, 1, "steps")
        values = _as_array(values, np.float64, 2, "values")
        if values.shape != (steps.shape[0], ids.shape[0]):
            expected = (steps.shape[0], ids.shape[0])
            raise ValueError(f"values has shape {values.shape}, expected {expected}")
        if self._arrays.values.shape[1] < self._capacity:
            self._fit_width(kernels.ring_required_width(self._live.counts, ids, steps.shape[0]))
        bad = kernels.ring_append_block(*self._live, self._alpha_short, self._alpha_long,
                                        ids, steps, values)
        if bad >= 0:
            self._raise_bad_id(int(ids[bad]), bad)

    def last(self, series_id: int) -> tuple[int, float]:
        """The newest point as ``(step, value)``, or ``(-1, nan)`` when the series is empty."""
        sid = self._check_id(series_id)
        rings = self._arrays
        if rings.counts[sid] == 0:
            return -1, float("nan")
        slot = (int(rings.heads[sid]) - 1) % rings.values.shape[1]
        return int(rings.steps[sid, slot]), float(rings.values[sid, slot])

    def last_of_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest point of every series, by id: ``(steps int64, values float64)`` copies,
        ``(-1, nan)`` for an empty series. One vectorised gather (a snapshot of 30,000 series
        would otherwise make 30,000 calls to :meth:`last`)."""
        rings = self._arrays
        live = len(self._keys)
        counts = rings.counts[:live]
        slots = (rings.heads[:live] - 1) % rings.values.shape[1]
        rows = np.arange(live)
        steps = np.where(counts > 0, rings.steps[rows, slots], -1)
        values = np.where(counts > 0, rings.values[rows, slots], np.nan)
        return steps, values

    def history(self, series_id: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Copies ``(steps int64, values float64)`` of the last ``n`` points (all when None), oldest
        first; fewer when the series holds fewer. ValueError for a negative ``n``."""
        sid = self._check_id(series_id)
        held = int(self._arrays.counts[sid])
        if n is not None:
            held = min(held, _non_negative(n, "n"))
        steps = np.empty(held, np.int64)
        values = np.empty(held, np.float64)
        rings = self._arrays
        kernels.ring_read(rings.values, rings.steps, rings.heads, rings.counts, sid, steps, values)
        return steps, values

    def window_stats(self, series_id: int, window: int | None = None) -> SeriesStats:
        """Statistics of the last ``window`` points (all held points when None).

        Only finite values count; with none, count is 0 and the window fields are NaN. The EMAs
        are the running ones over the whole series; ``last`` is the newest stored value (NaN if
        the series is empty, and possibly NaN/Inf as stored). See :func:`kernels.window_stats`.
        """
        steps, values = self.history(series_id, window)
        out = np.empty(kernels.N_STATS)
        kernels.window_stats(values, steps, out)
        return self._stats(int(series_id), out)

    def nbytes(self) -> int:
        """Bytes held by the store's arrays (allocated, not only filled)."""
        return sum(a.nbytes for a in self._arrays)

    def _stats(self, sid: int, out: np.ndarray) -> SeriesStats:
        """Build a :class:`SeriesStats` from a ``window_stats`` output and the running state."""
        k = kernels
        return SeriesStats(
            count=int(out[k.STAT_COUNT]), mean=float(out[k.STAT_MEAN]), std=float(out[k.STAT_STD]),
            min=float(out[k.STAT_MIN]), max=float(out[k.STAT_MAX]), median=float(out[k.STAT_MEDIAN]),
            p25=float(out[k.STAT_P25]), p75=float(out[k.STAT_P75]), p90=float(out[k.STAT_P90]),
            ema_short=float(self._arrays.ema_short[sid]), ema_long=float(self._arrays.ema_long[sid]),
            slope=float(out[k.STAT_SLOPE]), last=self.last(sid)[1],
        )

    def _create(self, metric: str, rank: int) -> int:
        """Create series ``(metric, rank)`` and return its id; grows the rows when full."""
        if not isinstance(metric, str):
            raise TypeError(f"metric must be a str, not {type(metric).__name__}")
        rank = operator.index(rank)
        sid = len(self._keys)
        if sid >= self._max_series:
            raise SeriesLimitError(metric, rank, self._max_series)
        rows, width = self._arrays.values.shape
        more_rows = min(2 * rows, self._max_series)
        if sid == rows:
            self._reallocate(more_rows, width)
        elif 2 * sid >= rows and more_rows > rows:
            # Touch every new row (series arrive in bursts: a job's first step creates them all)
            # up to the filled width, at least the first width: 4 kB a row at most beyond it.
            if not self._spare.preparing(more_rows, width):
                filled = int(self._live.counts.max()) if sid else 0
                self._spare.prepare(more_rows, width, more_rows,
                                    min(width, max(filled, _FIRST_WIDTH)))
        self._ids[(metric, rank)] = sid
        self._keys.append((metric, rank))
        self._live_rings = None  # one more live row: the views are made again when next used
        return sid

    def _fit_width(self, needed: int) -> None:
        """Widen the rings so no series wraps before it holds ``capacity`` points; once a series
        is half way there, have the next arrays prepared in the background."""
        rows, width = self._arrays.values.shape
        if width == self._capacity:
            return
        if needed > width:
            self._reallocate(rows, self._next_width(width, needed))
        elif 2 * needed > width:
            self._spare.prepare(rows, self._next_width(width, width + 1), len(self._keys), width)

    def _next_width(self, width: int, needed: int) -> int:
        wider = max(needed, _WIDTH_GROWTH * width)
        return self._capacity if wider > self._capacity // 8 else wider

    def _reallocate(self, rows: int, width: int) -> None:
        """Move to arrays of ``rows`` series by ``width`` points, keeping every live point.

        A narrower ring never wrapped (see ``_fit_width``), so its points sit at ``[0, count)`` and
        its next slot is ``count``.
        """
        old = self._live
        live = len(self._keys)
        new = self._spare.take(rows, width) or _allocate(rows, width)
        filled = int(old.counts.max()) if live else 0
        new.values[:live, :filled] = old.values[:, :filled]
        new.steps[:live, :filled] = old.steps[:, :filled]
        for name in ("heads", "counts", "ema_short", "ema_long"):
            getattr(new, name)[:live] = getattr(old, name)
        if width != old.values.shape[1]:
            new.heads[:live] = old.counts
        self._arrays = new
        self._live_rings = None

    def _raise_bad_id(self, sid: int, column: int) -> None:
        """Raise the error for the id the block kernel rejected (unknown or repeated)."""
        if 0 <= sid < len(self._keys):
            raise ValueError(f"series id {sid} appears more than once in one block (column {column})")
        raise IndexError(f"unknown series id {sid} in column {column}")

    def _check_id(self, series_id: int) -> int:
        """``series_id`` as an int; IndexError unless it names an existing series."""
        sid = operator.index(series_id)
        if not 0 <= sid < len(self._keys):
            raise IndexError(f"unknown series id {sid} (store holds {len(self._keys)} series)")
        return sid


class _SpareRings:
    """The store's next arrays, allocated and partly touched on a background thread before the
    receive loop needs them (see the module docstring). Only :meth:`prepare` and :meth:`take`
    are called, both from the store's owner; each preparation's thread fills a holder of its
    own, so a preparation given up on (another shape was needed) is simply dropped."""

    def __init__(self) -> None:
        self._current: _Preparation | None = None

    def prepare(self, rows: int, width: int, touched_rows: int, touched_width: int) -> None:
        """Start preparing ``rows`` × ``width`` arrays (once per shape), touching the block of
        ``touched_rows`` × ``touched_width``: where the copy of the current rings will write."""
        if not self.preparing(rows, width):
            self._current = _Preparation((rows, width), touched_rows, touched_width)

    def preparing(self, rows: int, width: int) -> bool:
        """True when arrays of this shape are being (or were) prepared."""
        return self._current is not None and self._current.shape == (rows, width)

    def take(self, rows: int, width: int) -> _Rings | None:
        """The prepared arrays if they have this shape (waiting for their thread), else None.
        Either way the preparation is over: nothing stays held."""
        current, self._current = self._current, None
        if current is None or current.shape != (rows, width):
            return None
        current.thread.join()
        return current.rings


class _Preparation:
    """One background allocation of ``shape``: ``rings`` once ``thread`` has finished."""

    def __init__(self, shape: tuple[int, int], touched_rows: int, touched_width: int) -> None:
        self.shape = shape
        self.rings: _Rings | None = None
        self.thread = threading.Thread(target=self._fill, args=(touched_rows, touched_width),
                                       name="rlmon-store-grow", daemon=True)
        self.thread.start()

    def _fill(self, touched_rows: int, touched_width: int) -> None:
        rings = _allocate(*self.shape)
        rings.values[:touched_rows, :touched_width].fill(0.0)  # numpy releases the GIL here
        rings.steps[:touched_rows, :touched_width].fill(0)
        self.rings = rings


def _allocate(rows: int, width: int) -> _Rings:
    """Fresh arrays for ``rows`` empty series of ``width`` slots (values/steps left uninitialised)."""
    return _Rings(
        np.empty((rows, width), np.float64),
        np.empty((rows, width), np.int64),
        np.zeros(rows, np.int64),
        np.zeros(rows, np.int64),
        np.full(rows, np.nan),
        np.full(rows, np.nan),
    )


def _as_array(x: object, dtype: type, ndim: int, name: str) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype`` and ``ndim`` dimensions, copied only if needed.

    TypeError when its dtype does not convert safely; ValueError on the wrong number of dimensions.
    """
    if type(x) is np.ndarray and x.dtype == dtype and x.ndim == ndim and x.flags.c_contiguous:
        return x
    a = np.asarray(x)
    if a.dtype == np.bool_ or not np.can_cast(a.dtype, dtype, "safe"):
        raise TypeError(f"{name} must hold {np.dtype(dtype).name} values, not {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), not {a.ndim}")
    return np.ascontiguousarray(a, dtype)


def _as_step(step: object) -> int:
    """``step`` as an int in the int64 range; TypeError for non-integers, OverflowError outside."""
    step = operator.index(step)
    if not _INT64_MIN <= step <= _INT64_MAX:
        raise OverflowError(f"step {step} does not fit in int64")
    return step


def _positive(x: object, name: str) -> int:
    """``x`` as an int >= 1, else ValueError (TypeError if not an integer)."""
    x = operator.index(x)
    if x < 1:
        raise ValueError(f"{name} must be >= 1, not {x}")
    return x


def _non_negative(x: object, name: str) -> int:
    """``x`` as an int >= 0, else ValueError (TypeError if not an integer)."""
    x = operator.index(x)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, not {x}")
    return x
