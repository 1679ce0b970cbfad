"""Everything that leaves the collector: the Prometheus endpoint and the end-of-run reports.

Exporters only read immutable :class:`collector.snapshot.CollectorSnapshot` objects; they never
touch the collector's ring buffers or its receive loop. Modules:

* :mod:`exporters.prometheus` — :class:`SnapshotCollector` (a prometheus_client custom collector)
  and :class:`MetricsServer` (``/metrics`` on loopback by default); names in ``docs/metrics.md``.
* :mod:`exporters.reports` — ``training_report.md`` and ``training_report.json``, seed format.
* :mod:`exporters.atomic` — temp file + fsync + rename, so no reader ever sees half a file.

Importing this package imports prometheus_client (through :mod:`exporters.prometheus`).
"""

from exporters.atomic import atomic_write_bytes, atomic_write_text
from exporters.prometheus import MetricsServer, SnapshotCollector, make_registry
from exporters.reports import write_final_reports, write_json_report, write_markdown_report

__all__ = [
    "MetricsServer",
    "SnapshotCollector",
    "atomic_write_bytes",
    "atomic_write_text",
    "make_registry",
    "write_final_reports",
    "write_json_report",
    "write_markdown_report",
]
