"""The ``rlmon`` command.

::

    rlmon collector --out DIR                  a standalone collector (writes DIR/collector.json)
    rlmon launch --out DIR -- torchrun ...     a collector beside a training command
    rlmon stop DIR --reason TEXT               an operator's coordinated stop
    rlmon report DIR                           rebuild the reports from the event log, offline
    rlmon verify DIR                           prove no acknowledged step was lost (exit 1 if not)
    rlmon keys DIR                             CURVE key pairs for ranks on other nodes
    rlmon relay --collector ADDR -- torchrun   one per node: its ranks reach the collector
                                               through one connection
    rlmon top DIR                              a live terminal view of a running collector
    rlmon demo                                 the main job: a small GRPO run on CPU, 2 ranks
    rlmon bench                                quick overhead figures (a source checkout)

The collector commands import the collector's dependencies (numpy, numba, prometheus-client)
lazily, so a training node with only pyzmq and msgpack can still run ``rlmon stop``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from rlmon.errors import ConfigError, RlmonError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rlmon`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except RlmonError as exc:
        print(f"rlmon {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    _add_collector(commands)
    _add_launch(commands)
    _add_stop(commands)
    _add_report(commands)
    _add_verify(commands)
    _add_keys(commands)
    _add_relay(commands)
    _add_demo(commands)
    _add_top(commands)
    _add_bench(commands)
    return parser


def _add_collector(commands) -> None:
    from collector.cli import add_arguments, add_process_arguments

    sub = commands.add_parser("collector", help="run a standalone collector")
    add_arguments(sub)
    add_process_arguments(sub)
    sub.set_defaults(handler=_cmd_collector)


def _add_launch(commands) -> None:
    from collector.cli import add_arguments

    sub = commands.add_parser("launch", help="run a command (e.g. torchrun) beside a collector",
                              usage="rlmon launch --out DIR [options] -- COMMAND ...")
    add_arguments(sub)
    sub.add_argument("--no-top", action="store_true",
                     help="no live view (on a terminal the view is drawn below the command's "
                          "output; elsewhere a status line every few seconds goes to stderr)")
    sub.add_argument("--total-steps", type=int, default=None,
                     help="the run's step count, for the live view's progress bar")
    sub.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    sub.set_defaults(handler=_cmd_launch)


def _add_stop(commands) -> None:
    sub = commands.add_parser("stop", help="ask every rank of a running job to stop")
    sub.add_argument("dir", type=Path, help="the run directory (holds collector.json)")
    sub.add_argument("--reason", required=True, help="why; shown on every rank and in the report")
    sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the collector")
    sub.set_defaults(handler=_cmd_stop)


def _add_report(commands) -> None:
    sub = commands.add_parser("report", help="rebuild the reports of a run from its event log")
    sub.add_argument("dir", type=Path, help="the run directory (holds events.rlog)")
    sub.add_argument("--kl-threshold", type=float, default=0.1)
    sub.set_defaults(handler=_cmd_report)


def _add_keys(commands) -> None:
    sub = commands.add_parser("keys", help="make CURVE key pairs for ranks on other nodes")
    sub.add_argument("dir", type=Path, help="key directory (server pair, clients/ allow-list)")
    sub.add_argument("--client", action="append", default=[], metavar="NAME",
                     help="make a client key pair NAME (repeat; default: one named 'rank')")
    sub.set_defaults(handler=_cmd_keys)


def _add_relay(commands) -> None:
    from rlmon.relay import DEFAULT_BIND

    sub = commands.add_parser("relay", help="one per node: forward its ranks to the collector "
                                            "over one connection (ZeroMQ's proxy)",
                              usage="rlmon relay [--collector ADDR] [options] [-- COMMAND ...]")
    sub.add_argument("--collector", default=None,
                     help="the collector's address (default: $RLMON_ENDPOINT); CURVE keys from "
                          "$RLMON_CURVE_SERVER_KEY and $RLMON_CURVE_CLIENT_SECRET")
    sub.add_argument("--bind", default=DEFAULT_BIND,
                     help=f"where this node's ranks connect (default {DEFAULT_BIND}, a free "
                          "loopback port; the ranks' link to the relay is not encrypted)")
    sub.add_argument("--ready-file", default=None,
                     help="write {endpoint, pid, collector} as JSON here once serving")
    sub.add_argument("cmd", nargs=argparse.REMAINDER,
                     help="a command to run with RLMON_ENDPOINT set to the relay (after --); "
                          "without one, print the relay's address and serve until SIGTERM")
    sub.set_defaults(handler=_cmd_relay)


def _cmd_relay(args: argparse.Namespace) -> int:
    from rlmon.relay import run_relay

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_relay(args.collector, args.bind, command, args.ready_file)


def _cmd_keys(args: argparse.Namespace) -> int:
    from rlmon.keys import make_keys

    for path in make_keys(args.dir, args.client or ["rank"]):
        print(path)
    print(f"collector: --curve-dir {args.dir}; each rank or operator: "
          f"RLMON_CURVE_SERVER_KEY={args.dir}/server.key and "
          f"RLMON_CURVE_CLIENT_SECRET=<its clients/NAME.key_secret>")
    return 0


def _add_verify(commands) -> None:
    from collector.verify import add_arguments, run

    sub = commands.add_parser("verify", help="prove from the event log that every step a rank "
                                             "logged was acknowledged, dropped and counted, or "
                                             "still held")
    add_arguments(sub)
    sub.set_defaults(handler=run)


def _add_demo(commands) -> None:
    sub = commands.add_parser("demo", help="a small GRPO (or PPO) training on CPU, 2 ranks, "
                                           "monitored")
    sub.add_argument("--out", type=Path, default=Path("rlmon_demo_out"), help="run directory")
    sub.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    sub.add_argument("--visualization-frequency", type=int, default=50,
                     help="dashboard_step_N.png and summary_step_N.html every N steps")
    sub.add_argument("--algo", choices=("grpo", "ppo"), default=None,
                     help="GRPO (the default) or PPO with a value network (passed on)")
    sub.add_argument("--quick", action="store_true",
                     help="a short smoke run without an injected failure (passed on)")
    sub.add_argument("--verbose", action="store_true",
                     help="also log the finer PPO mechanics, print every step (passed on)")
    sub.add_argument("train_args", nargs=argparse.REMAINDER,
                     help="flags for the training script after --, e.g. -- --inject none "
                          f"(default: {' '.join(DEFAULT_DEMO_ARGS)})")
    sub.set_defaults(handler=_cmd_demo)


def _add_top(commands) -> None:
    sub = commands.add_parser("top", help="a live terminal view of a running collector")
    sub.add_argument("dir", type=Path, help="the run directory (holds collector.json)")
    sub.add_argument("--interval", type=float, default=1.0,
                     help="seconds between redraws on a terminal (default 1)")
    sub.add_argument("--plain-interval", type=float, default=5.0,
                     help="seconds between status lines when not on a terminal (default 5)")
    sub.add_argument("--total-steps", type=int, default=None,
                     help="the run's step count, for the progress bar (else a logged "
                          "total_steps metric, else none)")
    sub.add_argument("--max-metrics", type=int, default=12, help="most metrics shown")
    sub.add_argument("--once", action="store_true", help="print the view once and exit")
    sub.add_argument("--wait", type=float, default=10.0,
                     help="seconds to wait for the collector to answer (default 10)")
    sub.set_defaults(handler=_cmd_top)


def _cmd_top(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("rich", "prometheus_client") if not importlib.util.find_spec(name)]
    if missing:
        raise ConfigError("rlmon top", f"needs {' and '.join(missing)}: "
                                       "pip install 'rlmon[collector]'")
    from rlmon.top import TopOptions, run_top

    options = TopOptions(interval=args.interval, plain_interval=args.plain_interval,
                         total_steps=args.total_steps, max_metrics=args.max_metrics,
                         once=args.once, wait=args.wait)
    return run_top(args.dir, options)


def _cmd_collector(args: argparse.Namespace) -> int:
    from collector.cli import run_collector

    return run_collector(args)


def _cmd_launch(args: argparse.Namespace) -> int:
    from collector.cli import collector_args
    from rlmon.launch import launch

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ConfigError("COMMAND", "give the command to run after --")
    return launch(args.out, command, collector_args(args), run_id=args.run_id,
                  top=not args.no_top, total_steps=args.total_steps)


def _cmd_stop(args: argparse.Namespace) -> int:
    from rlmon.operator import request_stop

    state = request_stop(args.dir, args.reason, args.timeout)
    print(json.dumps(state))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from collector.cli import replay
    from exporters.reports import write_final_reports

    state = replay(args.dir, kl_threshold=args.kl_threshold)
    snapshot = state.snapshot(time.time(), with_history=True, finished=True)
    from collector.service import render_final

    for path in write_final_reports(snapshot, args.dir) + render_final(snapshot, args.dir):
        print(path)
    return 0


#: What ``rlmon demo`` trains with when given no flags: 200 GRPO steps, a KL blow-up from 150.
DEFAULT_DEMO_ARGS = ("--inject", "kl_blowup", "--inject_step", "150")


def _cmd_demo(args: argparse.Namespace) -> int:
    from rlmon.launch import launch

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args and not args.quick:  # the full show: learning, a KL blow-up, a stop
        train_args = list(DEFAULT_DEMO_ARGS)
    train_args = [*_demo_switches(args), *train_args]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "rlmon.demo.train_grpo", *train_args]
    flags = ["--out", str(args.out), "--visualization-frequency", str(args.visualization_frequency)]
    code = launch(args.out, command, flags)
    _print_demo_summary(args.out)
    return code


def _demo_switches(args: argparse.Namespace) -> list[str]:
    """``--algo``, ``--quick`` and ``--verbose`` as given to ``rlmon demo``, for the trainer."""
    switches = ["--algo", args.algo] if args.algo else []
    return switches + [f"--{name}" for name in ("quick", "verbose") if getattr(args, name)]


def _print_demo_summary(out_dir: Path) -> None:
    report_md = out_dir / "training_report.md"
    if report_md.exists():
        print(f"\nrlmon demo: report at {report_md.resolve()}")
        print(f"rlmon demo: JSON at {(out_dir / 'training_report.json').resolve()}")
        print(f"rlmon demo: alerts at {(out_dir / 'alerts.jsonl').resolve()}")
        if (out_dir / "final_summary.html").exists():
            print(f"rlmon demo: open {(out_dir / 'final_summary.html').resolve()} in a browser "
                  f"(plots: {(out_dir / 'final_dashboard.png').resolve()})")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _add_bench(commands) -> None:
    sub = commands.add_parser("bench", help="quick overhead figures: benchmarks/run_all.py --quick")
    sub.add_argument("--full", action="store_true", help="the full measurement, not --quick")
    sub.add_argument("bench_args", nargs=argparse.REMAINDER,
                     help="flags for benchmarks/run_all.py after --, e.g. -- --parts percall")
    sub.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/run_all.py (``--quick`` unless ``--full``) in this interpreter."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.exists():
        raise ConfigError("rlmon bench", f"needs a source checkout ({script} is missing)")
    extra = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    quick = [] if args.full else ["--quick"]
    return subprocess.call([sys.executable, str(script), *quick, *extra])


if __name__ == "__main__":
    sys.exit(main())
