"""rlmon's exceptions.

The whole tree::

    RlmonError                 base of everything rlmon raises on purpose
    ├── ConfigError            a setting (environment variable, CLI flag, argument) is invalid;
    │                          ``.key`` names it
    ├── FrameRejected          the collector refused a frame; ``.reason`` is the counted reason
    └── CollectorUnavailable   a CLI command could not reach a collector (``rlmon stop``)

Nothing on a training rank's hot path raises: failures there become counters that travel to the
collector. ``ConfigError`` is raised by ``rlmon.init()`` only for invalid explicit arguments.
"""

from __future__ import annotations


class RlmonError(Exception):
    """Base class of the errors rlmon raises on purpose."""


class ConfigError(RlmonError, ValueError):
    """A setting is invalid; ``key`` names the setting (an env var, a flag or an argument)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class FrameRejected(RlmonError):
    """The collector refused a frame. ``reason`` is a short token counted in
    ``rlmon_frames_rejected_total{reason}``; ``detail`` is for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CollectorUnavailable(RlmonError):
    """A command-line tool could not reach the collector of a run directory in time."""
