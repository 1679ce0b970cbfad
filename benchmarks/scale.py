"""Scale: many simulated ranks against one collector (part 3).

For each rank count (default 64 → 256 → 1,024), a fresh lean process (it has imported only rlmon
and pyzmq) starts one real collector (:mod:`benchmarks.lag_tap`: ``python -m collector`` plus a
lag recorder) and forks the ranks. Each rank is its own process with its own ZeroMQ context and
DEALER socket, made after the fork by rlmon's real publisher (``rlmon.init()`` with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``RLMON_ENDPOINT``, ``RLMON_RUN_ID`` in its environment). All ranks
log 32 scalars at ``--rate`` steps/s on one shared schedule for ``--seconds``, call
``should_stop`` every step, then ``close()``.

Reported per rank count: the collector's CPU (``/proc/PID/stat``) and RSS (peak), the ranks' CPU
(``wait4``) and memory (sum of RSS, and of PSS, which splits pages shared after the fork), the
log-to-store lag of every block (p50/p99/max, and p99 over the first and the last fifth of the
window, to see growth), drops from the ranks' ledgers and the collector's ``/metrics``, losses
(steps emitted minus dropped minus stored), and ranks that fell behind their schedule. A verdict
says whether the collector kept up (p99 lag ≤ 250 ms, nothing dropped or lost).

With ``--ranks-per-relay K`` (K > 0) the ranks are split into groups of K, as on nodes of K GPUs,
and each group reaches the collector through its own relay (:class:`rlmon.relay.Relay`, ZeroMQ's
proxy; a forked process per group, listening on ``ipc://``): the collector then holds one
connection per group instead of one per rank. The relays' CPU is reported beside the ranks'.
Usage::

    python benchmarks/scale.py --ranks 64,256,1024 --seconds 30
    python benchmarks/scale.py --ranks 64,256,1024 --seconds 30 --ranks-per-relay 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq  # noqa: E402

from rlmon import wire  # noqa: E402
from rlmon.wire import Kind  # noqa: E402

from benchmarks.common import (REPO, by_label, child_env, cpu_seconds, fmt, fork_call,  # noqa: E402
                               int_list, percentiles, pss_bytes, reap, resolve, rss_bytes,
                               run_json_command, sample_sum, scrape, sleep_until, standalone,
                               status_kib, stop_process, table, write_json)

DEFAULTS = {"ranks": "64,256,1024", "seconds": 30.0, "rate": 10.0, "scalars": 32,
            "flush_interval": 0.02, "scale_rounds": 1, "ranks_per_relay": "0",
            "rank_kind": "publisher", "ranks_per_process": 1, "steps_per_frame": 1}
QUICK = {"ranks": "8,16", "seconds": 3.0}
LAG_BUDGET_S = 0.25
SCALE_NAMES = tuple(f"m{k:03d}" for k in range(254)) + ("reward", "kl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("scale (part 3)")
    group.add_argument("--ranks", help="comma-separated rank counts (default 64,256,1024)")
    group.add_argument("--seconds", type=float, help="measured seconds per rank count (30)")
    group.add_argument("--rate", type=float, help="steps per second per rank (10)")
    group.add_argument("--scalars", type=int, help="scalars per step (32)")
    group.add_argument("--flush-interval", type=float,
                       help="RLMON_FLUSH_INTERVAL of the ranks (rlmon's default 0.02 s)")
    group.add_argument("--scale-rounds", type=int, help="rounds over the rank counts (1)")
    group.add_argument("--rank-kind", choices=("publisher", "lean"),
                       help="publisher: each simulated rank runs rlmon's real publisher (the "
                            "default); lean: a minimal client of the wire protocol, one batch "
                            "per step, so more ranks fit on one host")
    group.add_argument("--ranks-per-process", type=int,
                       help="with --rank-kind lean: simulated ranks per process, each still with "
                            "its own socket (default 1: a process per rank)")
    group.add_argument("--steps-per-frame", type=int,
                       help="with --rank-kind lean: steps per BATCH frame (default 1; S > 1 is "
                            "what RLMON_FLUSH_INTERVAL = S / rate gives a publisher). The lag "
                            "is measured from a frame's newest step; its oldest waited "
                            "(S - 1) / rate longer in the rank, which the verdict adds")
    group.add_argument("--ranks-per-relay",
                       help="comma-separated K: 0 = ranks connect straight to the collector; "
                            "K > 0 = each group of K ranks through its own relay; several values "
                            "are measured one after the other for each rank count (default 0)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Each rank count in a fresh process, rounds after rounds; the per-count records."""
    records = []
    for round_index in range(args.scale_rounds):
        for ranks, per_relay in [(n, k) for n in int_list(args.ranks)
                                 for k in int_list(str(args.ranks_per_relay))]:
            result_path = out_dir / f"scale-{ranks}-{per_relay}-{round_index}.json"
            command = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--one", str(ranks),
                       "--seconds", str(args.seconds), "--rate", str(args.rate),
                       "--scalars", str(args.scalars), "--flush-interval", str(args.flush_interval),
                       "--ranks-per-relay", str(per_relay), "--rank-kind", args.rank_kind,
                       "--ranks-per-process", str(args.ranks_per_process),
                       "--steps-per-frame", str(args.steps_per_frame),
                       "--result", str(result_path)]
            via = f", {per_relay} per relay" if per_relay else ""
            print(f"  scale: {ranks} ranks{via} for {args.seconds:g} s", file=sys.stderr,
                  flush=True)
            outcome = run_json_command(command, timeout=args.seconds * 4 + 300 + ranks * 0.2)
            record = _load(result_path, outcome)
            record.update(ranks=ranks, round=round_index)
            records.append(record)
            result_path.unlink(missing_ok=True)
    return {"records": records, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def _load(path: Path, outcome: dict) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": outcome.get("error", "no result")}


# -- one rank count, in its own process ------------------------------------------------------------

def measure_one(ranks: int, seconds: float, rate: float, scalars: int, flush: float,
                ranks_per_relay: int = 0, rank_kind: str = "publisher",
                per_process: int = 1, steps_per_frame: int = 1) -> dict:
    """Collector, the relays (if any), ``ranks`` forked ranks, the measured window, the
    ledgers; the record."""
    import rlmon  # noqa: F401  (imported before the fork: the ranks share these pages)

    with tempfile.TemporaryDirectory(prefix="rlmon-scale-") as tmp:
        tmp_path = Path(tmp)
        max_series = series_needed(ranks, scalars)
        collector, info = _start_tapped_collector(tmp_path, ranks, max_series)
        try:
            start_delay = 2.0 + 0.006 * ranks
            plan = {"world": ranks, "endpoint": info["endpoint"], "t0": time.time() + start_delay,
                    "steps": int(seconds * rate), "period": 1.0 / rate, "scalars": scalars,
                    "flush": flush, "dir": str(tmp_path / "ranks"), "run_id": "bench-scale",
                    "relays": relay_endpoints(tmp_path, ranks, ranks_per_relay),
                    "ranks_per_relay": ranks_per_relay, "steps_per_frame": steps_per_frame}
            (tmp_path / "ranks").mkdir()
            relay_pids = [fork_call(relay_main, endpoint, info["endpoint"])
                          for endpoint in plan["relays"]]
            if rank_kind == "lean":
                pids = [fork_call(lean_ranks_main, first, min(per_process, ranks - first), plan)
                        for first in range(0, ranks, per_process)]
            else:
                pids = [fork_call(rank_main, rank, plan) for rank in range(ranks)]
            window = _watch(collector.pid, pids, plan, seconds)
            rank_cpu, unreaped = reap(pids, timeout=60 + 0.05 * ranks)
            collected = _quiescent_metrics(info["metrics_url"])
        finally:
            relay_cpu = stop_relays(relay_pids)
            finalize_s = stop_process(collector, timeout=600)
        lag = _lag_stats(tmp_path / "lag.npy", plan["t0"], plan["t0"] + seconds)
        ledgers = _ledgers(tmp_path / "ranks", ranks)
    return {**window, **collected, **ledgers, "lag": lag, "ranks_cpu_s": rank_cpu,
            "ranks_unreaped": unreaped, "collector_finalize_s": finalize_s,
            "relays": len(plan["relays"]), "relays_cpu_s": relay_cpu,
            "ranks_per_relay": ranks_per_relay, "rank_kind": rank_kind,
            "ranks_per_process": per_process if rank_kind == "lean" else 1,
            "steps_per_frame": steps_per_frame if rank_kind == "lean" else None,
            "steps_per_rank": plan["steps"], "scalars": scalars, "rate": rate, "seconds": seconds,
            "flush_interval": flush, "max_series": max_series}


def series_needed(ranks: int, scalars: int) -> int:
    """``--max-series`` that holds every (metric, rank) series plus the cross-rank ones: the
    default (4,096) is too small past 120 ranks of 32 scalars, and the collector would reject
    (and count as ``series_limit``) the blocks of new series."""
    return max(4096, ranks * scalars + 4 * scalars + 64)


def _start_tapped_collector(tmp: Path, ranks: int, max_series: int
                            ) -> tuple[subprocess.Popen, dict]:
    from rlmon.launch import wait_for_collector

    out = tmp / "collector"
    command = [sys.executable, str(REPO / "benchmarks" / "lag_tap.py"), "--lag-out",
               str(tmp / "lag.npy"), "--out", str(out), "--quiet", "--world-size", str(ranks),
               "--max-series", str(max_series), "--visualization-frequency", "0",
               "--run-id", "bench-scale"]
    out.mkdir(parents=True)
    process = subprocess.Popen(command, env=child_env(), stdin=subprocess.DEVNULL, cwd=REPO)
    return process, wait_for_collector(out / "collector.json", process, 180)


def relay_endpoints(tmp: Path, ranks: int, ranks_per_relay: int) -> list[str]:
    """One ``ipc://`` address per group of ``ranks_per_relay`` ranks (none without relays)."""
    if ranks_per_relay <= 0:
        return []
    return [f"ipc://{tmp}/relay-{index}.sock" for index in range(-(-ranks // ranks_per_relay))]


def relay_main(bind: str, collector_endpoint: str) -> int:
    """A relay (in a forked child) until SIGTERM."""
    import signal
    import threading

    from rlmon.relay import Relay

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay = Relay(collector_endpoint, bind)
    relay.start()
    while not stop.wait(0.5) and relay.running:
        pass
    return 0 if relay.close() else 1


def stop_relays(pids: list[int]) -> float:
    """SIGTERM the relays; their CPU seconds."""
    import signal

    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return reap(pids, timeout=30)[0]


def endpoint_of(rank: int, plan: dict) -> str:
    """Where ``rank`` connects: its group's relay when there are relays, else the collector."""
    relays = plan["relays"]
    return relays[rank // plan["ranks_per_relay"]] if relays else plan["endpoint"]


def rank_main(rank: int, plan: dict) -> int:
    """A simulated rank (in a forked child): rlmon's real publisher, the shared schedule; behind
    its group's relay when there are relays."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % 8), WORLD_SIZE=str(plan["world"]),
                      RLMON_ENDPOINT=endpoint_of(rank, plan), RLMON_RUN_ID=plan["run_id"],
                      RLMON_FLUSH_INTERVAL=str(plan["flush"]))
    import rlmon

    mon = rlmon.init()
    names = SCALE_NAMES[-plan["scalars"]:]
    late, worst, t0, period = 0, 0.0, plan["t0"], plan["period"]
    for step in range(plan["steps"]):
        delay = t0 + step * period - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            late, worst = late + 1, max(worst, -delay)
        mon.log(step, {name: 0.01 + 1e-4 * ((step * 7 + k) % 13) for k, name in enumerate(names)})
        mon.should_stop(step)
    mon.close()
    stats = mon.statistics()
    stats.update(seq=getattr(mon._publisher, "_seq", None), late_steps=late, worst_behind_s=worst)
    Path(plan["dir"], f"{rank}.json").write_text(json.dumps(stats))
    return 0


def lean_ranks_main(first: int, count: int, plan: dict) -> int:
    """Lean simulated ranks ``first .. first + count - 1`` (``--rank-kind lean``, in one forked
    child): no publisher thread; each rank has its own DEALER socket and speaks the wire protocol
    itself (HELLO, one packed BATCH per step sent at once, ACKs read as they come, BYE). The
    collector sees the frames a publisher sends at one step per batch, at a fraction of the
    host's CPU, so more ranks fit on one host. With ``count`` > 1 the process's ranks share its
    ZeroMQ I/O thread (``--ranks-per-process``)."""
    context = zmq.Context(io_threads=1)
    context.setsockopt(zmq.MAX_SOCKETS, count + 64)
    ranks = [LeanRank(context, rank, plan) for rank in range(first, first + count)]
    by_socket = {rank.sock: rank for rank in ranks}
    poller = zmq.Poller()
    for rank in ranks:
        poller.register(rank.sock, zmq.POLLIN)
    t0, period, per_frame = plan["t0"], plan["period"], plan["steps_per_frame"]
    for step in range(plan["steps"]):
        delay = t0 + step * period - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            for rank in ranks:
                rank.late, rank.worst = rank.late + 1, max(rank.worst, -delay)
        if (step + 1) % per_frame == 0 or step == plan["steps"] - 1:
            oldest = step - step % per_frame
            for rank in ranks:
                rank.send_steps(oldest, step, t0, period)
        for sock, _ in poller.poll(0):
            by_socket[sock].read_acks()
    for rank in ranks:
        rank.say_bye(plan["steps"] - 1)
    deadline = time.monotonic() + 30
    while any(not rank.bye for rank in ranks) and time.monotonic() < deadline:
        for sock, _ in poller.poll(200):
            by_socket[sock].read_acks()
    for rank in ranks:
        rank.write_ledger(plan)
        rank.sock.close(linger=0)
    context.term()
    return 0


class LeanRank:
    """One lean simulated rank: its socket, its seq, what the collector acknowledged."""

    def __init__(self, context: zmq.Context, rank: int, plan: dict) -> None:
        self.rank = rank
        self.run, self.inc = plan["run_id"], (rank * 7919 + 1) & 0x7FFFFFFF
        self.names = list(SCALE_NAMES[-plan["scalars"]:])
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.connect(endpoint_of(rank, plan))
        self.seq = self.acked_seq = self.dropped = self.late = 0
        self.worst, self.bye = 0.0, False
        self.send(Kind.HELLO, world=plan["world"], local_rank=rank % 8, pid=os.getpid(),
                  host="sim", t=time.time())

    def send(self, kind: Kind, **fields: Any) -> None:
        """Encode and send without blocking; a refused frame is counted."""
        frame = wire.encode(wire.envelope(kind, self.run, self.rank, self.inc, **fields))
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def send_steps(self, first: int, last: int, t0: float, period: float) -> None:
        """Steps ``first..last`` of the schedule as one packed BATCH; each step's time is the
        moment the schedule reached it (the last one: now), as ``mon.log`` would stamp it."""
        now = time.time()
        steps = list(range(first, last + 1))
        times = [min(now, t0 + step * period) for step in steps[:-1]] + [now]
        rows = [[0.01 + 1e-4 * ((step * 7 + k) % 13) for k in range(len(self.names))]
                for step in steps]
        self.seq += 1
        self.send(Kind.BATCH, seq=self.seq, t=now, step=last,
                  blocks=[wire.pack_block(self.names, steps, times, rows)])

    def read_acks(self) -> None:
        """Take every reply waiting on the socket."""
        while True:
            try:
                reply = wire.decode(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if reply.kind is Kind.ACK:
                self.acked_seq = max(self.acked_seq, reply.fields["seq"])
                self.bye = self.bye or bool(reply.fields.get("bye"))

    def say_bye(self, last_step: int) -> None:
        """BYE with the last seq sent."""
        self.send(Kind.BYE, seq=self.seq, step=last_step)

    def write_ledger(self, plan: dict) -> None:
        """The same per-rank JSON as :func:`rank_main` writes."""
        steps = plan["steps"]
        acked = min(steps, self.acked_seq * plan["steps_per_frame"])  # a frame holds S steps
        stats = {"emitted": steps, "acked": acked,
                 "dropped": {"queue_full": self.dropped} if self.dropped else {},
                 "unacked": steps - acked, "seq": self.seq, "acked_seq": self.acked_seq,
                 "late_steps": self.late, "worst_behind_s": self.worst}
        Path(plan["dir"], f"{self.rank}.json").write_text(json.dumps(stats))


def _watch(collector_pid: int, pids: list[int], plan: dict, seconds: float) -> dict[str, Any]:
    """Collector CPU over the window, its RSS every 0.5 s, the ranks' memory at the midpoint."""
    sleep_until(plan["t0"])
    cpu_start, started = cpu_seconds(collector_pid), time.monotonic()
    rss_peak, memory = 0, {}
    end = plan["t0"] + seconds
    while time.time() < end:
        rss_peak = max(rss_peak, rss_bytes(collector_pid) or 0)
        if not memory and time.time() >= plan["t0"] + seconds / 2:
            memory = _ranks_memory(pids)
        time.sleep(min(0.5, max(0.0, end - time.time())))
    cpu_used = (cpu_seconds(collector_pid) or 0) - (cpu_start or 0)
    window = time.monotonic() - started
    return {"collector_cpu_percent": 100 * cpu_used / window, "collector_rss_peak_mb":
            max(rss_peak, 1024 * (status_kib(collector_pid, "VmHWM") or 0)) / 2**20,
            "collector_rss_end_mb": (rss_bytes(collector_pid) or 0) / 2**20, **memory}


def _ranks_memory(pids: list[int]) -> dict[str, float]:
    rss = [rss_bytes(pid) or 0 for pid in pids]
    pss = [pss_bytes(pid) or 0 for pid in pids]
    return {"ranks_rss_sum_mb": sum(rss) / 2**20, "ranks_pss_sum_mb": sum(pss) / 2**20,
            "rank_rss_mb": (sum(rss) / len(rss)) / 2**20 if rss else 0.0}


def _quiescent_metrics(url: str) -> dict[str, Any]:
    """The collector's counts once nothing more arrives (two equal scrapes 0.6 s apart)."""
    previous, text = None, ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = scrape(url, timeout=30)
        batches = sample_sum(text, "rlmon_batches_received_total")
        if batches == previous:
            break
        previous = batches
        time.sleep(0.6)
    return {"collector_batches": sample_sum(text, "rlmon_batches_received_total"),
            "collector_scalars": sample_sum(text, "rlmon_scalars_received_total"),
            "collector_dropped": by_label(text, "rlmon_dropped_events_total", "reason"),
            "collector_rejected": by_label(text, "rlmon_frames_rejected_total", "reason"),
            "ranks_known": sample_sum(text, "rlmon_ranks_known")}


def _lag_stats(path: Path, start: float, end: float) -> dict[str, Any]:
    """Percentiles of the log-to-store lag of blocks stored in the window (plus 1 s)."""
    import numpy as np

    try:
        samples = np.load(path)
    except OSError:
        return {"n": 0}
    inside = samples[(samples[:, 0] >= start) & (samples[:, 0] <= end + 1.0)]
    if not len(inside):
        return {"n": 0}
    lags = inside[:, 1]
    fifth = (end - start) / 5
    first = inside[inside[:, 0] < start + fifth][:, 1]
    last = inside[inside[:, 0] >= end - fifth][:, 1]
    stats = {k: float(v) for k, v in percentiles(lags.tolist()).items()}
    stats["p99_first_fifth"] = float(np.quantile(first, 0.99)) if len(first) else None
    stats["p99_last_fifth"] = float(np.quantile(last, 0.99)) if len(last) else None
    return stats


def _ledgers(directory: Path, ranks: int) -> dict[str, Any]:
    """Totals of the ranks' ledgers."""
    files = [directory / f"{rank}.json" for rank in range(ranks)]
    stats = [json.loads(f.read_text()) for f in files if f.exists()]
    dropped: dict[str, int] = {}
    for s in stats:
        for reason, count in s["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    return {"ranks_reported": len(stats), "emitted": sum(s["emitted"] for s in stats),
            "ranks_dropped": dropped,
            "unacked_batches": sum((s["seq"] or 0) - s["acked_seq"] for s in stats),
            "late_steps": sum(s["late_steps"] for s in stats),
            "ranks_behind": sum(1 for s in stats if s["late_steps"]),
            "worst_behind_s": max((s["worst_behind_s"] for s in stats), default=0.0)}


# -- summaries -------------------------------------------------------------------------------------

def verdict(record: dict[str, Any]) -> str:
    """Whether one collector kept up at this rank count, and why not."""
    if "error" in record:
        return f"error: {record['error'][:200]}"
    problems = []
    lag = record.get("lag", {})
    held = oldest_step_wait(record)
    if lag.get("p99") is None or lag["p99"] + held > LAG_BUDGET_S:
        also = f" + {held:.3f} s in the rank" if held else ""
        problems.append(f"p99 lag {lag.get('p99', float('nan')):.3f} s{also} > {LAG_BUDGET_S} s")
    first, last = lag.get("p99_first_fifth"), lag.get("p99_last_fifth")
    if first and last and last > 2 * first and last > 0.05:
        problems.append(f"lag grows ({first:.3f} → {last:.3f} s)")
    lost = loss_steps(record)
    if lost:
        problems.append(f"{lost:,.0f} steps lost")
    if sum(record.get("ranks_dropped", {}).values()):
        problems.append(f"drops {record['ranks_dropped']}")
    if record.get("collector_rejected"):
        problems.append(f"collector rejected frames {record['collector_rejected']}")
    if record.get("ranks_unreaped"):
        problems.append(f"{record['ranks_unreaped']} ranks had to be killed")
    if record.get("ranks_behind"):
        problems.append(f"{record['ranks_behind']} ranks fell behind schedule (the host, not the "
                        f"collector, may be saturated)")
    return "kept up" if not problems else "; ".join(problems)


def oldest_step_wait(record: dict[str, Any]) -> float:
    """Seconds the oldest step of a multi-step lean frame waited in the rank before its frame
    was sent (the lag tap measures from the newest step)."""
    per_frame = record.get("steps_per_frame") or 1
    return (per_frame - 1) / record["rate"] if per_frame > 1 and record.get("rate") else 0.0


def loss_steps(record: dict[str, Any]) -> float:
    """Steps emitted by the ranks, minus dropped (counted), minus stored by the collector."""
    scalars = record.get("scalars") or 1
    counted = sum(v for k, v in record.get("ranks_dropped", {}).items()
                  if k in ("send_full", "bad_value"))
    return record.get("emitted", 0) - counted - record.get("collector_scalars", 0) / scalars


def markdown(results: dict[str, Any]) -> str:
    """The scale table and the per-count verdicts."""
    s = results["settings"]
    rows = []
    for r in results["records"]:
        lag = r.get("lag", {})
        rows.append([r["ranks"], r.get("relays", 0), r.get("round"), r.get("collector_cpu_percent"),
                     r.get("collector_rss_peak_mb"), _ms(lag.get("p50")), _ms(lag.get("p99")),
                     _ms(lag.get("max")), f"{fmt(_ms(lag.get('p99_first_fifth')))} → "
                     f"{fmt(_ms(lag.get('p99_last_fifth')))}", r.get("emitted"),
                     sum(r.get("ranks_dropped", {}).values()) if "emitted" in r else None,
                     loss_steps(r) if "emitted" in r else None, r.get("ranks_cpu_s"),
                     r.get("relays_cpu_s") if r.get("relays") else None,
                     r.get("ranks_pss_sum_mb"), r.get("ranks_rss_sum_mb"), verdict(r)])
    return ("## Scale: simulated ranks against one collector\n\n"
            + _ranks_description(s) + ", "
            f"{s['scalars']} scalars at {s['rate']:g} steps/s for {s['seconds']:g} s, flush "
            f"interval {s['flush_interval']:g} s; collector with `--visualization-frequency 0` "
            "and `--max-series` raised to hold every (metric, rank) series. "
            "Lag: from the `mon.log` call of a block's last step to the block in the store "
            "(includes the flush interval). Collector CPU: % of one core over the window. "
            "Ranks' memory: sum over ranks at mid-window (PSS divides the pages shared after the "
            "fork).\n\n" + table(
                ["ranks", "relays", "round", "collector CPU %", "collector RSS peak MB",
                 "lag p50 ms", "lag p99 ms", "lag max ms", "p99 first → last fifth ms",
                 "steps emitted", "dropped", "lost", "ranks CPU s", "relays CPU s",
                 "ranks PSS MB", "ranks RSS MB", "verdict"], rows)
            + "\nRelays: 0 = every rank connected straight to the collector; otherwise each group "
              "of `--ranks-per-relay` ranks went through its own relay (`rlmon.relay.Relay`, "
              "ZeroMQ's proxy, a forked process listening on `ipc://`).\n")


def _setting(record: dict[str, Any]) -> str:
    """A plot label for how the ranks of ``record`` ran: client, steps per frame, relays."""
    per_relay = record.get("ranks_per_relay", 0)
    label = "lean" if record.get("rank_kind") == "lean" else "publisher"
    if (record.get("steps_per_frame") or 1) > 1:
        label += f", {record['steps_per_frame']} steps/frame"
    return label + (f", {per_relay} per relay" if per_relay else ", direct")


def _ranks_description(settings: dict[str, Any]) -> str:
    """How the simulated ranks were run, for the table's caption."""
    if settings.get("rank_kind") != "lean":
        return "Each rank a forked process with its own DEALER socket (rlmon's publisher)"
    per_process = settings.get("ranks_per_process") or 1
    where = ("a forked process per rank" if per_process == 1
             else f"{per_process} ranks per forked process, sharing its ZeroMQ I/O thread")
    per_frame = settings.get("steps_per_frame") or 1
    frames = ("one packed batch per step" if per_frame == 1 else
              f"one packed batch per {per_frame} steps; the lag below is from a batch's newest "
              f"step, and the verdict adds the {per_frame - 1} step periods its oldest waited")
    return ("Each rank its own DEALER socket, a lean client of the wire protocol ("
            f"{frames}, no publisher thread), {where}")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``scale_lag.png``: p99 log-to-store lag and the collector's CPU by rank count, one
    colour per setting (the ranks' client, steps per frame, straight or through relays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in results["records"] if r.get("lag", {}).get("n")]
    if not good:
        return []
    fig, ax = plt.subplots(figsize=(7, 5))
    cpu = ax.twinx()
    all_ranks = sorted({r["ranks"] for r in good})
    for index, setting in enumerate(sorted({_setting(r) for r in good})):
        rows = sorted((r for r in good if _setting(r) == setting), key=lambda r: r["ranks"])
        xs, color = [r["ranks"] for r in rows], f"C{index}"
        ax.plot(xs, [r["lag"]["p99"] * 1e3 for r in rows], "s-", color=color,
                label=f"lag p99, {setting}")
        cpu.plot(xs, [r.get("collector_cpu_percent", 0) for r in rows], ":", marker="x",
                 color=color, label=f"collector CPU %, {setting} (right)")
    ax.axhline(LAG_BUDGET_S * 1e3, color="red", linestyle=":", label="p99 budget 250 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(all_ranks, [str(x) for x in all_ranks])
    ax.set_xlabel("simulated ranks")
    ax.set_ylabel("log → store lag, ms")
    ax.set_title("Collector lag and CPU against rank count")
    cpu.set_ylabel("collector CPU, % of one core")
    cpu.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    extra = cpu.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left", fontsize=7)
    fig.tight_layout()
    path = out_dir / "scale_lag.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> dict | None:
    """Run this part alone, or (``--one N --result PATH``) one rank count in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--one" in argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--one", type=int, required=True)
        parser.add_argument("--result", type=Path, required=True)
        add_arguments(parser)
        args = parser.parse_args(argv)
        resolve(args, DEFAULTS, {})  # flags not given take the defaults, as in a full run
        record = measure_one(args.one, args.seconds, args.rate, args.scalars, args.flush_interval,
                             int(args.ranks_per_relay), args.rank_kind, args.ranks_per_process,
                             args.steps_per_frame)
        write_json(args.result, record)
        return None
    return standalone("scale", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
