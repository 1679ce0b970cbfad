"""Command line of the collector process (``rlmon collector`` and ``python -m collector``).

Also the offline replay used by ``rlmon report DIR``: the event log fed through a fresh
:class:`~collector.state.CollectorState`, then the same report writers as a live run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from rlmon.errors import ConfigError

if TYPE_CHECKING:  # the heavy imports (numpy, numba, prometheus-client) wait until needed
    from collector.service import CollectorService
    from collector.state import CollectorState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The collector's flags, shared by ``rlmon collector`` and ``rlmon launch``."""
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:*",
                        help="ZeroMQ address to bind (default: a free loopback TCP port)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus endpoint address")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus endpoint port (0: a free one, -1: off)")
    parser.add_argument("--metrics-certfile", default=None,
                        help="serve /metrics over HTTPS with this certificate (PEM)")
    parser.add_argument("--metrics-keyfile", default=None, help="the certificate's private key")
    parser.add_argument("--metrics-client-cafile", default=None,
                        help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--curve-dir", type=Path, default=None,
                        help="serve CURVE only, to the clients whose keys are in DIR/clients "
                             "(made by `rlmon keys DIR`); for ranks on other nodes")
    parser.add_argument("--max-rank-labels", type=int, default=64,
                        help="per-rank series on /metrics up to this many ranks; past it, "
                             "aggregates and the worst 5 ranks only")
    parser.add_argument("--run-id", default="", help="run id (default: a fresh one)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks expected (ranks also announce it themselves)")
    parser.add_argument("--kl-threshold", type=float, default=0.1,
                        help="KL warning threshold; twice it is critical and stops the run")
    parser.add_argument("--reward-hack-threshold", type=float, default=0.3,
                        help="relative quality fall, while reward rises, that warns (twice it: critical)")
    parser.add_argument("--window-size", type=int, default=50, help="reward-hacking trend window, steps")
    parser.add_argument("--sample-size", type=int, default=10, help="baseline prompts for forgetting")
    parser.add_argument("--comparison-frequency", type=int, default=5,
                        help="steps between forgetting comparisons")
    parser.add_argument("--degradation-threshold", type=float, default=0.7,
                        help="similarity to baseline below which a sample is degraded")
    parser.add_argument("--rules", type=Path, default=None,
                        help="a TOML or YAML file of detector rules ([rules.<detector>] tables)")
    parser.add_argument("--rule", action="append", default=[], metavar="DETECTOR.KEY=VALUE",
                        help="override one rule setting, e.g. kl.critical_above=0.3 (repeatable)")
    parser.add_argument("--visualization-frequency", type=int, default=500,
                        help="write dashboard_step_N.png and summary_step_N.html every N steps (0: off)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to DIR/tensorboard (a sink process)")
    parser.add_argument("--wandb", action="store_true",
                        help="also write a W&B run in offline mode to DIR/wandb (a sink process)")
    parser.add_argument("--callback", action="append", default=[], metavar="MODULE:CLASS",
                        help="run this TrainingCallback class beside the collector, fed from the "
                             "event log (repeatable; see exporters/callbacks.py)")
    parser.add_argument("--capacity", type=int, default=10_000, help="points kept per series")
    parser.add_argument("--max-series", type=int, default=4_096, help="most (metric, rank) series")


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags only the collector process itself takes."""
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="print nothing but warnings")


def collector_args(args: argparse.Namespace) -> list[str]:
    """The flags of ``args`` as a command line for a collector child process."""
    return ["--out", str(args.out), "--endpoint", args.endpoint, "--metrics-host", args.metrics_host,
            "--metrics-port", str(args.metrics_port), "--world-size", str(args.world_size),
            *[item for flag in ("certfile", "keyfile", "client_cafile")
              if getattr(args, f"metrics_{flag}") for item in
              (f"--metrics-{flag.replace('_', '-')}", getattr(args, f"metrics_{flag}"))],
            "--kl-threshold", str(args.kl_threshold), "--capacity", str(args.capacity),
            "--max-series", str(args.max_series),
            "--visualization-frequency", str(args.visualization_frequency),
            "--max-rank-labels", str(args.max_rank_labels),
            *(["--curve-dir", str(args.curve_dir)] if args.curve_dir else []),
            *(["--tensorboard"] if args.tensorboard else []), *(["--wandb"] if args.wandb else []),
            "--reward-hack-threshold", str(args.reward_hack_threshold),
            "--window-size", str(args.window_size), "--sample-size", str(args.sample_size),
            "--comparison-frequency", str(args.comparison_frequency),
            "--degradation-threshold", str(args.degradation_threshold),
            *(["--rules", str(args.rules)] if args.rules else []),
            *[item for rule in args.rule for item in ("--rule", rule)],
            *[item for spec in args.callback for item in ("--callback", spec)]]


def build_service(args: argparse.Namespace) -> CollectorService:
    """A configured, not yet started, collector from parsed flags."""
    from collector.service import CollectorService, ServiceConfig, new_control_key
    from collector.state import StateConfig

    run_id = args.run_id or _read_collector_json(args.out).get("run_id") or uuid.uuid4().hex[:12]
    state = StateConfig(run_id=run_id, world_size=args.world_size,
                        capacity=args.capacity, max_series=args.max_series,
                        kl_threshold=args.kl_threshold, control_key=new_control_key(),
                        rules=rules_from_args(args), window_size=args.window_size,
                        sample_size=args.sample_size,
                        comparison_frequency=args.comparison_frequency,
                        degradation_threshold=args.degradation_threshold)
    return CollectorService(ServiceConfig(
        out_dir=args.out, endpoint=args.endpoint, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port, parent_pid=getattr(args, "parent_pid", 0), state=state,
        visualization_frequency=args.visualization_frequency, metrics_tls=_tls_of(args),
        sinks=_sinks_of(args), max_rank_labels=args.max_rank_labels, curve_dir=args.curve_dir))


def _sinks_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The sinks asked for, checked to be installed now rather than failing later."""
    import importlib.util

    sinks = tuple(name for name in ("tensorboard", "wandb") if getattr(args, name))
    for name in sinks:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--{name}", f"the {name} sink needs the '{name}' package: "
                                           f"pip install 'rlmon[{name}]'")
    return sinks


def _tls_of(args: argparse.Namespace) -> dict[str, str]:
    """TLS settings of the /metrics endpoint from the flags (empty: plain HTTP)."""
    if bool(args.metrics_certfile) != bool(args.metrics_keyfile):
        raise ConfigError("--metrics-certfile", "give both --metrics-certfile and --metrics-keyfile")
    if args.metrics_client_cafile and not args.metrics_certfile:
        raise ConfigError("--metrics-client-cafile", "client certificates need --metrics-certfile")
    return {key: value for key, value in (("certfile", args.metrics_certfile),
                                          ("keyfile", args.metrics_keyfile),
                                          ("client_cafile", args.metrics_client_cafile)) if value}


def rules_from_args(args: argparse.Namespace) -> dict:
    """The detector rules: defaults, the seeds' thresholds, then --rules FILE, then --rule flags.
    Raises ConfigError naming the bad key."""
    from collector.rules import DEFAULT_RULES, kl_rule, load_rules

    base = dict(DEFAULT_RULES)
    base["kl"] = kl_rule(args.kl_threshold)
    hack = args.reward_hack_threshold
    if not hack > 0:
        raise ConfigError("--reward-hack-threshold", "must be > 0")
    base["reward_hacking"] = replace(base["reward_hacking"], warning_above=hack,
                                     critical_above=2 * hack)
    base["forgetting"] = replace(base["forgetting"], warning_below=args.degradation_threshold)
    return load_rules(args.rules, args.rule, base=base)


def run_collector(args: argparse.Namespace) -> int:
    """Run a collector until SIGTERM/SIGINT, then write the reports. Returns an exit code."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="rlmon collector: %(message)s")
    _check_positive(args)
    service = build_service(args)
    callbacks = _start_callbacks(args)
    try:
        service.install_signal_handlers()
        service.start()
        if not args.quiet:
            print(json.dumps({"endpoint": service.endpoint, "metrics_url": service.metrics_url,
                              "out": str(args.out)}), flush=True)
        try:
            service.run()
        finally:
            written = service.finalize()
    finally:
        if callbacks is not None:
            from exporters.callbacks import stop_callback_process
            stop_callback_process(callbacks)
    if not args.quiet:
        print(f"rlmon collector: wrote {', '.join(p.name for p in written)} in {args.out}", flush=True)
    return 0


def _start_callbacks(args: argparse.Namespace):
    """The ``--callback`` process (None without the flag): started before the collector serves,
    so a bad ``module:Class`` is a ConfigError naming it before anything is written."""
    if not getattr(args, "callback", None):
        return None
    import os

    from exporters.callbacks import start_callback_process

    Path(args.out).mkdir(parents=True, exist_ok=True)
    return start_callback_process(Path(args.out), args.callback, os.getpid(), quiet=args.quiet)


def replay(out_dir: Path, kl_threshold: float = 0.1) -> CollectorState:
    """Rebuild a run's state from its event log (offline; the run may be finished or killed)."""
    from collector.eventlog import FILE_NAME, ReadResult, read_records
    from collector.service import message_time
    from collector.state import CollectorState, StateConfig
    from rlmon import wire
    from rlmon.errors import FrameRejected

    path = Path(out_dir) / FILE_NAME
    if not path.exists():
        raise ConfigError("DIR", f"no event log at {path}")
    info = _read_collector_json(out_dir)
    state = CollectorState(StateConfig(run_id=info.get("run_id", "replay"), kl_threshold=kl_threshold))
    results: list[ReadResult] = []
    first: float | None = None
    for payload in read_records(path, results):
        try:
            message = wire.decode(payload)
        except FrameRejected as exc:
            state.reject(exc.reason)
            continue
        when = message_time(message)
        first = when if first is None else min(first, when)
        try:
            state.handle(message, None, when)
        except Exception:  # a record that once failed live fails again: count it, go on
            state.reject("internal_error")
    if first is not None:
        state.started_at = first  # the run's start, not the replay's
    state.finish(time.time())
    if results and results[0].skipped_bytes:
        state.rejected_by_reason["torn_tail"] += 1
    return state


def _read_collector_json(out_dir: Path) -> dict:
    try:
        return json.loads((Path(out_dir) / "collector.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_positive(args: argparse.Namespace) -> None:
    if args.capacity < 1:
        raise ConfigError("--capacity", "must be >= 1")
    if args.max_series < 1:
        raise ConfigError("--max-series", "must be >= 1")
    if not args.kl_threshold > 0:
        raise ConfigError("--kl-threshold", "must be > 0")
    if args.max_rank_labels < 0:
        raise ConfigError("--max-rank-labels", "must be >= 0")
    if args.visualization_frequency < 0:
        raise ConfigError("--visualization-frequency", "must be >= 0")
    for flag in ("window_size", "sample_size", "comparison_frequency"):
        if getattr(args, flag) < 1:
            raise ConfigError("--" + flag.replace("_", "-"), "must be >= 1")
    if not 0 < args.degradation_threshold <= 1:
        raise ConfigError("--degradation-threshold", "must be in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    """``python -m collector``."""
    parser = argparse.ArgumentParser(prog="python -m collector", description=__doc__)
    add_arguments(parser)
    add_process_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_collector(args)
    except ConfigError as exc:
        print(f"rlmon collector: error: {exc}", file=sys.stderr)
        return 2
