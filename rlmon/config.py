"""Rank-side settings, read from the environment in exactly one place: :meth:`RankConfig.from_env`.

Environment variables (torchrun sets the first three; ``rlmon launch`` sets ``RLMON_ENDPOINT`` and
``RLMON_RUN_ID``):

``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``
    this process's place in the job (default 0, 0, 1).
``RLMON_ENDPOINT``
    the collector's ZeroMQ address, e.g. ``tcp://127.0.0.1:5555`` or ``ipc:///tmp/x.sock``.
``RLMON_RUN_ID``
    a run id shared by all ranks (default: ``TORCHELASTIC_RUN_ID`` or a fresh one).
``RLMON_DISABLE``
    ``1``/``true``/``yes`` turns every call into a no-op.
``RLMON_OUT``
    where the embedded collector writes its reports (default ``./rlmon_out/<run id>``).
``RLMON_FLUSH_INTERVAL``
    seconds between background flushes (default 0.02).
``RLMON_STOP_SYNC_EVERY``
    opt-in exact stop agreement through ``torch.distributed`` every K steps (default 0: off).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Mapping

from rlmon.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}


@dataclass(kw_only=True, slots=True)
class RankConfig:
    """How one training process publishes to the collector."""

    rank: int = 0
    """Global rank (``RANK``)."""
    local_rank: int = 0
    """Rank on this node (``LOCAL_RANK``)."""
    world_size: int = 1
    """Number of ranks in the job (``WORLD_SIZE``)."""
    endpoint: str | None = None
    """Collector address; ``None`` means no collector is configured."""
    run_id: str = ""
    """Run id shared by every rank; filled in when empty."""
    disabled: bool = False
    """Every call is a no-op when true."""
    out_dir: str | None = None
    """Output directory of the embedded collector (single-process runs only)."""
    flush_interval: float = 0.02
    """Seconds between background flushes of the pending queue."""
    max_pending: int = 100_000
    """Logged steps held before ``log`` starts dropping (and counting) new ones."""
    send_hwm: int = 1_000
    """ZeroMQ send high-water mark, in batches."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats when nothing else was sent."""
    close_timeout: float = 0.5
    """Seconds ``close()`` waits for the collector to acknowledge the last batch."""
    resend_batches: int = 4096
    """Unacknowledged batches a rank holds for re-sending (the oldest is dropped, counted, past it)."""
    resend_bytes: int = 64 * 1024 * 1024
    """Bytes of unacknowledged batches a rank holds for re-sending."""
    resend_after: float = 30.0
    """Seconds without any acknowledgement making progress before the held batches are sent
    again anyway (then 2×, 4×… up to 120 s apart). A reconnection re-sends them at once."""
    stop_sync_every: int = 0
    """If > 0, agree on stops through a torch.distributed MAX all-reduce every K steps."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError("WORLD_SIZE", f"must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError("RANK", f"must be in [0, {self.world_size}), got {self.rank}")
        if self.flush_interval <= 0:
            raise ConfigError("RLMON_FLUSH_INTERVAL", "must be > 0 seconds")
        if self.max_pending < 1 or self.send_hwm < 1:
            raise ConfigError("max_pending", "queue bounds must be >= 1")
        if self.stop_sync_every < 0:
            raise ConfigError("RLMON_STOP_SYNC_EVERY", "must be >= 0")
        if not self.run_id:
            self.run_id = uuid.uuid4().hex[:12]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> RankConfig:
        """Build the config from ``env`` (default ``os.environ``); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "rank": _int(env, "RANK", 0),
            "local_rank": _int(env, "LOCAL_RANK", 0),
            "world_size": _int(env, "WORLD_SIZE", 1),
            "endpoint": env.get("RLMON_ENDPOINT") or None,
            "run_id": env.get("RLMON_RUN_ID") or env.get("TORCHELASTIC_RUN_ID", ""),
            "disabled": env.get("RLMON_DISABLE", "").strip().lower() in _TRUE,
            "out_dir": env.get("RLMON_OUT") or None,
            "flush_interval": _float(env, "RLMON_FLUSH_INTERVAL", 0.02),
            "stop_sync_every": _int(env, "RLMON_STOP_SYNC_EVERY", 0),
        }
        if values["run_id"] == "none":  # torchrun's placeholder when no rdzv id is given
            values["run_id"] = ""
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(key, f"expected an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(key, f"expected a number, got {raw!r}") from None
