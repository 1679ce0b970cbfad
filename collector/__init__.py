"""The rlmon collector: one process per job that receives every rank's events, keeps their history
in Numba ring buffers, runs the detectors, decides coordinated stops, and feeds the exporters.

Pipeline, one module per stage: :mod:`collector.service` (receive loop and sockets) →
:mod:`collector.eventlog` (durable log) → :mod:`collector.state` (ingest and decisions) →
:mod:`collector.store` / :mod:`collector.kernels` (ring buffers, statistics) →
:mod:`collector.aggregate` (cross-rank steps) → :mod:`collector.detectors` →
:mod:`collector.stop` (stop state machine) → :mod:`collector.snapshot` (what exporters read).
"""
