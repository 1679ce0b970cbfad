"""The collector process: receive → event log → state → replies, snapshots for the exporters.

One thread runs the receive loop and owns every mutable structure; the Prometheus endpoint runs in
prometheus_client's server thread and reads the latest immutable snapshot. SIGTERM or SIGINT ends
the loop; :meth:`CollectorService.finalize` then completes pending steps and writes the reports.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import zmq

from collector import kernels
from collector.eventlog import FILE_NAME as EVENT_LOG_NAME
from collector.eventlog import EventLog, ReadResult, read_records
from collector.security import CurveGuard
from collector.snapshot import Alert, CollectorSnapshot, StopSnapshot
from collector.state import CollectorState, Reply, StateConfig
from exporters.atomic import atomic_write_text
from exporters.prometheus import MetricsServer
from exporters.reports import write_final_reports
from rlmon import wire
from rlmon.errors import ConfigError, FrameRejected
from rlmon.keys import check_libzmq
from rlmon.processes import process_alive
from rlmon.wire import Kind, Route

log = logging.getLogger("rlmon.collector")

#: Seconds a sink process may take to drain the event log after the collector finished.
SINK_DRAIN_SECONDS = 60.0
#: Frames handled per loop iteration before the group commit and the acknowledgements.
MAX_FRAMES_PER_ITERATION = 2000
#: A relay counts as connected (``rlmon_relays``) while it sent a frame within this many seconds.
RELAY_SILENCE_SECONDS = 60.0


@dataclass(kw_only=True, slots=True)
class ServiceConfig:
    """Where the collector listens and writes."""

    out_dir: Path
    """Run directory: event log, alerts, reports, collector.json."""
    endpoint: str = "tcp://127.0.0.1:*"
    """ZeroMQ address to bind (``*`` as the port picks a free one)."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus endpoint (loopback by default)."""
    metrics_port: int = 0
    """Port of the Prometheus endpoint (0 picks a free one; -1 disables it)."""
    snapshot_interval: float = 0.25
    """Seconds between snapshots published to the exporters (longer when one takes more than a
    tenth of this: a snapshot never costs more than 10 % of the receive loop)."""
    parent_pid: int = 0
    """Finish when this process is gone (the embedded default); 0 to disable."""
    metrics_tls: dict[str, str] = field(default_factory=dict)
    """``certfile``/``keyfile`` (HTTPS) and ``client_cafile`` (require client certificates)."""
    max_rank_labels: int = 64
    curve_dir: Path | None = None
    """CURVE keys (``rlmon keys``): serve only clients whose public key is in ``curve_dir/clients``."""
    """Per-rank series on /metrics up to this many ranks (aggregates and worst-k past it)."""
    sinks: tuple[str, ...] = ()
    """Exporters run as a child process tailing the event log: ``tensorboard``, ``wandb``."""
    visualization_frequency: int = 500
    """Write dashboard_step_N.png and summary_step_N.html every this many steps (0: never)."""
    state: StateConfig = field(default_factory=lambda: StateConfig(run_id="run"))

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError("--endpoint", f"not a ZeroMQ address: {self.endpoint!r}")
        if self.snapshot_interval <= 0:
            raise ConfigError("--snapshot-interval", "must be > 0")


class CollectorService:
    """A running collector. Use :meth:`start`, then :meth:`run` (blocks), then :meth:`finalize`."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.state = CollectorState(config.state, on_alert=self._record_alert,
                                    on_stop=self._record_stop)
        self._stop_requested = threading.Event()
        self._snapshot: CollectorSnapshot | None = None
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._metrics: MetricsServer | None = None
        self._event_log: EventLog | None = None
        self._alerts_file = None
        self._lock_file = None
        self.endpoint = ""
        self.metrics_url = ""
        self._renderer = StepRenderer(self)
        self._sink_process: subprocess.Popen | None = None
        self._replaying = False
        self.replayed_records = 0
        self._guard: CurveGuard | None = None
        self.relayed_frames = 0
        """Frames that came through a relay (``rlmon relay``)."""
        self._relays_seen: dict[bytes, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Claim the run directory, open the log, bind the socket and the metrics endpoint, and
        write ``collector.json`` (the ready signal)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        raise_open_file_limit()
        self._claim_directory()
        kernels.warm_up()  # compile or load the Numba cache before declaring readiness
        self.replayed_records = self._replay_log()
        self._event_log = EventLog(self.out_dir)
        self._alerts_file = open(self.out_dir / "alerts.jsonl", "a", buffering=1, encoding="utf-8")
        self._bind()
        self._publish_snapshot(time.time())
        if self.config.metrics_port >= 0:
            self._metrics = MetricsServer(lambda: self._snapshot,
                                          max_rank_labels=self.config.max_rank_labels)
            self._metrics.start(self.config.metrics_host, self.config.metrics_port,
                                **self.config.metrics_tls)
            self.metrics_url = self._metrics.url
        self._write_collector_json()
        self._start_sinks()

    def _start_sinks(self) -> None:
        """Start the sink process (TensorBoard / W&B offline) beside this collector."""
        if not self.config.sinks:
            return
        command = [sys.executable, "-m", "exporters.sinks_main", "--out", str(self.out_dir),
                   "--follow", "--collector-pid", str(os.getpid()),
                   *[f"--{name}" for name in self.config.sinks]]
        self._sink_process = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def _stop_sinks(self) -> None:
        """Let the sink drain the log (it ends by itself once this collector is finished)."""
        process, self._sink_process = self._sink_process, None
        if process is None:
            return
        try:
            process.wait(SINK_DRAIN_SECONDS)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def request_stop(self, *_: Any) -> None:
        """End the receive loop soon (signal-handler safe)."""
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the loop; the reports are still written."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> None:
        """Serve until :meth:`request_stop` or the parent process is gone."""
        next_snapshot = next_parent_check = 0.0
        while not self._stop_requested.is_set():
            self.serve_once(timeout_ms=50)
            now = time.time()
            self._renderer.after_iteration(now)
            if now >= next_snapshot:
                self._publish_snapshot(now)
                # A snapshot of tens of thousands of series takes milliseconds: never spend more
                # than a tenth of the loop's time on them (at worst /metrics ages a little more).
                cost = time.time() - now
                next_snapshot = now + max(self.config.snapshot_interval, 10 * cost)
            if now >= next_parent_check:
                self._check_parent()
                self.state.tick(now)
                next_parent_check = now + 1.0

    def serve_once(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for frames, handle what arrived, commit, acknowledge, and
        send stop states that are due. Returns the number of frames handled."""
        assert self._socket is not None
        handled = 0
        acks: dict[Route, tuple[int, int, bool]] = {}
        replies: list[Reply] = []
        if self._log_failing():  # take nothing new until the disk takes what is pending
            self._stop_requested.wait(timeout_ms / 1000)
        elif self._socket.poll(timeout_ms, zmq.POLLIN):
            handled = self._receive(acks, replies)
        durable = self._commit_log()
        now = time.time()
        if durable:  # never acknowledge what a failed write or fsync may have lost
            replies.extend(self.state.ack(identity, rank, inc, bye)
                           for identity, (rank, inc, bye) in acks.items())
        replies.extend(self.state.resends(now))
        self._send(replies)
        return handled

    def _log_failing(self) -> bool:
        return self._event_log is not None and bool(self._event_log.failing)

    def _commit_log(self) -> bool:
        """Group commit; on a write/fsync failure raise EVENT_LOG_FAILED (once) and keep the
        batches unacknowledged (the ranks hold and re-send them); clear it when a commit works."""
        if self._event_log is None:
            return True
        durable = self._event_log.commit()
        self.state.system_condition(
            "EVENT_LOG_FAILED", "event log", not durable,
            f"EVENT_LOG_FAILED: cannot write the event log ({self._event_log.failing}); "
            "acknowledgements stop until it can", time.time())
        return durable

    def finalize(self) -> list[Path]:
        """Drain what is queued, complete pending steps, write the reports, release everything."""
        if self._socket is not None:
            while self.serve_once(timeout_ms=100):
                pass
        now = time.time()
        self.state.finish(now)
        self._renderer.wait()
        snapshot = self._with_service_extra(self.state.snapshot(now, with_history=True, finished=True))
        self._snapshot = snapshot
        written = write_final_reports(snapshot, self.out_dir)
        written += render_final(snapshot, self.out_dir)
        self.close()
        self._stop_sinks()
        return written

    def close(self) -> None:
        """Stop serving and release sockets, files and the directory lock."""
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None
        for resource in (self._event_log, self._alerts_file, self._lock_file):
            if resource is not None:
                try:
                    resource.close()
                except OSError as exc:  # a full disk: what was never written was never acknowledged
                    log.error("closing %s: %s", getattr(resource, "name", resource), exc)
        self._event_log = self._alerts_file = self._lock_file = None

    @property
    def snapshot(self) -> CollectorSnapshot | None:
        """The latest published snapshot."""
        return self._snapshot

    # -- internals ---------------------------------------------------------------------------------

    def _claim_directory(self) -> None:
        """One collector per run directory: hold an exclusive lock on ``collector.lock``."""
        self._lock_file = open(self.out_dir / "collector.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise ConfigError("--out", f"another collector is using {self.out_dir}") from None

    def _replay_log(self) -> int:
        """A restart on a run directory: rebuild the state from its event log (batches held,
        aggregates, rank table, stop state), so re-sent batches are recognised and the run goes
        on where it was. A torn tail is skipped (and cut when the log reopens). Returns the
        records replayed."""
        path = self.out_dir / EVENT_LOG_NAME
        if not path.exists() or path.stat().st_size == 0:
            return 0
        results: list[ReadResult] = []
        self._replaying = True
        try:
            for payload in read_records(path, results):
                try:
                    message = wire.decode(payload)
                except FrameRejected as exc:
                    self.state.reject(exc.reason)
                    continue
                try:
                    self.state.handle(message, None, message_time(message))
                except Exception:  # as live: a bug costs the record, never the restart
                    self.state.reject("internal_error")
                    log.exception("internal error replaying a %s record", message.kind.name)
        finally:
            self._replaying = False
        count = results[0].records if results else 0
        log.warning("restarted on %s: replayed %d records of its event log%s", self.out_dir, count,
                    f" (skipped a torn tail of {results[0].skipped_bytes} bytes)"
                    if results and results[0].skipped_bytes else "")
        return count

    def _bind(self) -> None:
        check_libzmq()
        self._context = zmq.Context(io_threads=1)
        sock = self._context.socket(zmq.ROUTER)
        if self.config.curve_dir is not None:
            self._guard = CurveGuard(self._context, self.config.curve_dir)
            self._guard.secure(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            sock.bind(self.config.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError("--endpoint", f"cannot bind {self.config.endpoint}: {exc}") from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock

    def _receive(self, acks: dict[Route, tuple[int, int, bool]], replies: list[Reply]) -> int:
        handled = 0
        now = time.time()
        while handled < MAX_FRAMES_PER_ITERATION:
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            handled += 1
            try:
                route, frame = wire.split_route(parts)
            except FrameRejected as exc:
                self.state.reject(exc.reason)
                continue
            if len(route) > 1:
                self.relayed_frames += 1
                self._relays_seen[route[0]] = now
            self._handle_frame(route, frame, now, acks, replies)
        return handled

    def _handle_frame(self, identity: Route, frame: bytes, now: float,
                      acks: dict[Route, tuple[int, int, bool]], replies: list[Reply]) -> None:
        try:
            message = wire.decode(frame)
        except FrameRejected as exc:
            self.state.reject(exc.reason)
            return
        if message.kind in (Kind.ACK, Kind.STOP_STATE, Kind.REFUSED, Kind.CHECKPOINT_STATE,
                            Kind.RESULT):
            self.state.reject("unexpected_kind")
            return
        if self.state.is_duplicate(message):  # a re-sent batch already logged: only re-acknowledge
            acks.setdefault(identity, (message.rank, message.inc, False))
            return
        if message.kind in (Kind.BATCH, Kind.HELLO, Kind.BYE) and self._event_log is not None:
            self._event_log.append(frame)
        try:
            replies.extend(self.state.handle(message, identity, now))
            if message.kind is Kind.BYE:  # its ACK vouches for the batches: only after the commit
                acks[identity] = (message.rank, message.inc, True)
        except Exception:  # a bug must cost one frame, never the collector
            self.state.reject("internal_error")
            log.exception("internal error while handling a %s frame", message.kind.name)
            return
        if message.kind is Kind.BATCH:
            acks.setdefault(identity, (message.rank, message.inc, False))

    def _send(self, replies: list[Reply]) -> None:
        for reply in replies:
            try:
                frame = wire.encode(reply.fields)
            except (TypeError, ValueError, OverflowError):  # e.g. a stop step past uint64
                self.state.reject("internal_error")
                continue
            try:
                self._socket.send_multipart([*reply.identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError:  # peer gone or its queue full: the resend logic tries again
                pass

    def _publish_snapshot(self, now: float) -> None:
        if self._guard is not None:  # handshakes refused by CURVE/ZAP, counted like bad frames
            refused = self._guard.refusals()
            if refused:
                self.state.rejected_by_reason["auth"] = refused
        self._snapshot = self._with_service_extra(self.state.snapshot(now))

    def _with_service_extra(self, snapshot: CollectorSnapshot) -> CollectorSnapshot:
        """Add what the service itself measured (drawing lag, dashboards written, relays)."""
        extra = {**snapshot.extra, "render_loop_lag_seconds": self._renderer.max_lag,
                 "dashboards_rendered": tuple(self._renderer.rendered),
                 "relayed_frames": self.relayed_frames,
                 "relays": self._live_relays(snapshot.taken_at)}
        return dataclasses.replace(snapshot, extra=MappingProxyType(extra))

    def _live_relays(self, now: float) -> int:
        """Relays heard from within RELAY_SILENCE_SECONDS (older ones are forgotten)."""
        for relay_id, seen in list(self._relays_seen.items()):
            if now - seen > RELAY_SILENCE_SECONDS:
                del self._relays_seen[relay_id]
        return len(self._relays_seen)

    def _record_alert(self, alert: Alert) -> None:
        if self._replaying:  # already in alerts.jsonl from before the restart
            return
        if self._alerts_file is not None:
            try:
                self._alerts_file.write(json.dumps(_alert_json(alert)) + "\n")
            except OSError as exc:  # a full disk: the alert still reaches /metrics and the log
                log.error("cannot append to alerts.jsonl: %s", exc)
        log.warning("alert at step %d: %s %s", alert.step, alert.severity, alert.message)

    def _record_stop(self, state: StopSnapshot) -> None:
        if self._replaying:
            return
        if self._event_log is not None:
            self._event_log.append(self.state.stop_record(state))
        log.warning("stop decided (generation %d): every rank stops at step %d: %s",
                    state.generation, state.stop_at_step, state.reason)

    def _check_parent(self) -> None:
        pid = self.config.parent_pid
        if pid and not process_alive(pid):
            log.warning("parent process %d is gone; finishing", pid)
            self.request_stop()

    def _write_collector_json(self) -> None:
        key_path = self.out_dir / "control.key"
        key_path.touch(mode=0o600)
        key_path.write_text(self.config.state.control_key)
        info = {"endpoint": self.endpoint, "metrics_url": self.metrics_url, "pid": os.getpid(),
                "run_id": self.config.state.run_id, "out_dir": str(self.out_dir.resolve()),
                "control_key_file": str(key_path.resolve()), "started_at": self.state.started_at}
        if self.config.curve_dir is not None:
            info["curve_server_key"] = str((Path(self.config.curve_dir) / "server.key").resolve())
        atomic_write_text(self.out_dir / "collector.json", json.dumps(info, indent=2) + "\n")


def render_final(snapshot: CollectorSnapshot, out_dir: Path) -> list[Path]:
    """The plots, HTML page and monitoring_data.json of the end of a run (never raises)."""
    try:
        from exporters.render import render_reports
        return render_reports(snapshot, out_dir)
    except Exception:
        log.exception("could not write the plots and the HTML report")
        return []


class StepRenderer:
    """Writes ``dashboard_step_N.png`` and ``summary_step_N.html`` every
    ``visualization_frequency`` steps in a forked child, so drawing never stalls the receive
    loop: the child renders from its copy-on-write view of the state and exits. It also measures
    the receive loop's longest gap between iterations while a child draws (the lag drawing
    costs ingestion), published as ``render_loop_lag_seconds`` in the snapshot's ``extra``."""

    def __init__(self, service: CollectorService) -> None:
        self.service = service
        self.child: int | None = None
        self.next_step = service.config.visualization_frequency
        self.rendered: list[int] = []
        self.max_lag = 0.0
        self._last_iteration = 0.0

    def after_iteration(self, now: float) -> None:
        """Reap a finished child, track the loop's lag while one draws, start one when due."""
        if self.child is not None:
            self.max_lag = max(self.max_lag, now - self._last_iteration)
            self._reap(os.WNOHANG)
        self._last_iteration = now
        frequency = self.service.config.visualization_frequency
        step = self.service.state.ranks.furthest_step()
        if frequency > 0 and self.child is None and step >= self.next_step > 0:
            self._start(self.next_step)
            self.next_step = (step // frequency + 1) * frequency

    def wait(self) -> None:
        """Wait for a child still drawing (end of run)."""
        if self.child is not None:
            self._reap(0)

    def _reap(self, flags: int) -> None:
        try:
            pid, _ = os.waitpid(self.child, flags)
        except ChildProcessError:
            pid = self.child
        if pid:
            self.child = None

    def _start(self, step: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: draw from this copy of the state, then leave without cleanup
            code = 0
            try:
                from exporters.render import render_reports
                snapshot = self.service.state.snapshot(time.time(), with_history=True)
                render_reports(snapshot, self.service.out_dir, step)
            except BaseException:
                log.exception("could not draw the step %d dashboard", step)
                code = 1
            finally:
                os._exit(code)
        self.child = pid
        self.rendered.append(step)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connected rank holds a TCP
    socket, and the usual soft limit (1,024) is below a thousand ranks plus the collector's own
    files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 1 << 20), hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit above %d", soft)


def message_time(message: wire.Message) -> float:
    """The sender's clock in a message (``t``), else now: the time a replayed record is
    handled at."""
    value = message.fields.get("t")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else time.time()


def new_control_key() -> str:
    """A random key that operators' stop requests must carry (stored mode 0600 in the run dir)."""
    return secrets.token_hex(16)


def _alert_json(alert: Alert) -> dict[str, Any]:
    return {"step": alert.step, "severity": alert.severity, "type": alert.type,
            "metric": alert.metric, "value": alert.value, "threshold": alert.threshold,
            "message": alert.message, "time": alert.time, "rank": alert.rank}
