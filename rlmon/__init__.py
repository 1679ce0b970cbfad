"""rlmon: monitoring for RL fine-tuning of language models that never slows the training loop.

Training ranks call::

    import rlmon
    mon = rlmon.init()                       # RANK/LOCAL_RANK/WORLD_SIZE from torchrun
    mon.log(step, {"reward": r, "kl": kl})   # queued; sent by a background thread
    if mon.should_stop(step):                # coordinated: every rank stops at the same step
        break
    mon.close()

``RLMON_ENDPOINT`` names the collector (``rlmon launch`` sets it). With none configured, a
single-process script starts a local collector itself (the embedded default) and finalizes it on
``close()``. ``RLMON_DISABLE=1`` turns every call into a no-op.

This package imports only the standard library, pyzmq and msgpack; torch is touched only when a
tensor is logged or a stop agreement is asked for.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, Sequence

from rlmon.config import RankConfig
from rlmon.errors import ConfigError, RlmonError
from rlmon.monitor import Monitor, NullMonitor

__version__ = "0.1.0"
#: The seeds' API (:mod:`rlmon.seed`), imported on first use so ``import rlmon`` stays light.
SEED_NAMES = ("TrainingMonitor", "TrainingEvent", "TrainingPhase", "TrainingCallback",
              "VerbosityLevel", "MetricsStore", "SampleComparator", "QualityAnalyzer",
              "QualityAlert", "PPOMetricsTracker", "PlotManager", "ReportGenerator",
              "setup_grpo_monitoring", "GRPOMonitoringIntegration", "RewardMonitor",
              "RewardMetricsLogger", "RewardVisualizer")
__all__ = ["init", "get", "Monitor", "NullMonitor", "RankConfig", "ConfigError", "RlmonError",
           "__version__", *SEED_NAMES]

log = logging.getLogger("rlmon")

_lock = threading.Lock()
_current: Monitor | NullMonitor | None = None


def __getattr__(name: str) -> Any:
    """Load the seed-compatible names from :mod:`rlmon.seed`, and ``RlmonCallback`` from
    :mod:`rlmon.integrations.transformers`, on first access."""
    if name in SEED_NAMES:
        import rlmon.seed

        value = getattr(rlmon.seed, name)
        globals()[name] = value
        return value
    if name == "RlmonCallback":  # imports transformers: only on first use, never at import rlmon
        from rlmon.integrations.transformers import RlmonCallback
        return RlmonCallback
    raise AttributeError(f"module 'rlmon' has no attribute {name!r}")


def init(**overrides: Any) -> Monitor | NullMonitor:
    """Start publishing from this process and return its monitor. Idempotent: a second call returns
    the same monitor until it is closed.

    Keyword arguments override the environment (any :class:`RankConfig` field, e.g.
    ``endpoint=``, ``run_id=``, ``disabled=``). Raises :class:`ConfigError` only for an invalid
    setting; a missing or dead collector never raises."""
    global _current
    with _lock:
        if _current is not None and not getattr(_current, "_closed", False):
            return _current
        _current = _start(RankConfig.from_env(**overrides))
        atexit.register(_current.close)
        return _current


def get() -> Monitor | NullMonitor | None:
    """The monitor started by :func:`init` in this process, or None."""
    return _current


def _start(config: RankConfig, collector_args: Sequence[str] = (),
           wait_until_ready: bool = False) -> Monitor | NullMonitor:
    """The monitor for ``config``: disabled, connected to ``RLMON_ENDPOINT``, or with an embedded
    collector started with ``collector_args`` (waited for when ``wait_until_ready``)."""
    if config.disabled:
        return NullMonitor(config)
    if config.endpoint:
        return Monitor(config, config.endpoint)
    if config.world_size > 1:
        log.warning("rlmon: RLMON_ENDPOINT is not set in a %d-rank job; monitoring is off on this "
                    "rank (start the job with `rlmon launch`)", config.world_size)
        return NullMonitor(config)
    from rlmon.embedded import start_embedded_collector

    try:
        embedded = start_embedded_collector(config, list(collector_args))
    except Exception as exc:  # no collector dependencies, say: train anyway
        log.warning("rlmon: could not start a local collector (%s); monitoring is off", exc)
        return NullMonitor(config)
    if wait_until_ready and not embedded.wait_until_ready():
        log.warning("rlmon: the local collector did not start; see its output above")
    return Monitor(config, embedded.endpoint, on_close=embedded.finalize,
                   before_close=embedded.wait_until_ready)
