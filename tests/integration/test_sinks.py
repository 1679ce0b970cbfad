"""Sinks: a real collector's event log as TensorBoard event files and a W&B offline run.

The TensorBoard files are read back with TensorBoard's own loader (``EventAccumulator``); the W&B
run file (``run-*.wandb``: wandb's LevelDB-style record log of ``wandb_internal_pb2.Record``
protobufs) is read back record by record with wandb's own protobuf classes. Tests that need
tensorboard or wandb skip when the package is missing, and fail instead when ``CI`` is set.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from collector.eventlog import FILE_NAME, EventLog
from exporters.sinks import (CollectorWatch, EventLogTail, SinkOptions, StepAssembler,
                             process_alive, row_scalars)
from rlmon import wire
from rlmon.config import RankConfig
from rlmon.monitor import Monitor
from rlmon.wire import Kind
from tests.integration.helpers import child_env, running_collector, stop_process, wait_for

WORLD = 2


def _need(module: str) -> None:
    """Skip without ``module``; in CI a missing sink package is a failure, not a skip. Looks the
    package up without importing it (importing wandb patches this process's stdout)."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (the test extra must bring it)")
        pytest.skip(f"{module} not installed")


def _reward(step: int, rank: int) -> float:
    return step / 10 + rank


def _kl(step: int) -> float:
    return 0.001 * step  # below the KL detector's threshold: no stop in these runs


def _publish(endpoint: str, steps: range, run_id: str = "sinks") -> None:
    """Log ``steps`` from every rank of a 2-rank world, then close (close waits for the BYE ack,
    so everything is in the event log when this returns)."""
    monitors = [Monitor(RankConfig(rank=r, world_size=WORLD, endpoint=endpoint, run_id=run_id),
                        endpoint) for r in range(WORLD)]
    try:
        for step in steps:
            for rank, mon in enumerate(monitors):
                mon.log(step, {"reward": _reward(step, rank), "kl": _kl(step)})
    finally:
        for mon in monitors:
            mon.close()


def _sink_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "exporters.sinks_main", "--out", str(out), *flags]


def _sink_env(tmp_path: Path) -> dict[str, str]:
    """wandb keeps its settings and caches under the test's directory, not the user's home."""
    return child_env(WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                     WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                     WANDB_DATA_DIR=str(tmp_path / "wandb-data"))


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar series in ``log_dir`` through TensorBoard's own loader: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():  # the sink has not started writing yet
        return {}
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def _wandb_records(run_file: Path):
    """The ``Record`` protobufs of a ``run-*.wandb`` file: a 7-byte header (``:W&B``, 0xBEE1,
    version 0), then 32 KiB blocks of chunks ``crc32 u32 | length u16 | type u8 | data`` (type 1
    a whole record, 2/3/4 its first/middle/last piece), the crc seeded with the type byte."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    offset, pieces = 7, b""
    while offset + 7 <= len(data):
        room = 32768 - offset % 32768
        crc, length, kind = struct.unpack_from("<IHB", data, offset)
        if room < 7 or kind == 0:  # block padding
            offset += room
            continue
        chunk = data[offset + 7:offset + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {offset}"
        offset += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def read_wandb_run(run_file: str) -> dict:
    """Run name and project, history (step -> row) and final summary of one ``run-*.wandb``."""
    run, history, summary = {}, {}, {}
    for record in _wandb_records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"name": record.run.display_name, "project": record.run.project}
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in record.history.item}
            history[int(row["_step"])] = row
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                            for i in record.summary.update})
    return {"run": run, "history": history, "summary": summary}


def _wandb_run(out: Path) -> tuple[dict, dict[int, dict[str, float]], dict]:
    """(run, history, summary) of the one offline run in ``out``, read in a child process:
    importing wandb patches ``sys.stdout``/``sys.stderr`` for good, which pytest's process must
    not suffer."""
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    script = ("import json, sys\n"
              "from tests.integration.test_sinks import read_wandb_run\n"
              "print(json.dumps(read_wandb_run(sys.argv[1])))\n")
    result = subprocess.run([sys.executable, "-c", script, str(runs[0])], env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    content = json.loads(result.stdout)
    history = {int(step): row for step, row in content["history"].items()}
    return content["run"], history, content["summary"]


def _check_tensorboard(out: Path, steps: range) -> None:
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert set(scalars) == {f"{m}/{s}" for m in ("reward", "kl") for s in ("rank0", "rank1", "mean")}
    for rank in range(WORLD):
        assert scalars[f"reward/rank{rank}"] == pytest.approx(
            {s: _reward(s, rank) for s in steps}, rel=1e-6)
    assert scalars["reward/mean"] == pytest.approx({s: s / 10 + 0.5 for s in steps}, rel=1e-6)
    assert scalars["kl/mean"] == pytest.approx({s: _kl(s) for s in steps}, rel=1e-6, abs=1e-9)


def _check_wandb(out: Path, steps: range, run_id: str) -> None:
    run, history, summary = _wandb_run(out)
    assert run == {"name": run_id, "project": "rlmon"}
    assert sorted(history) == list(steps)
    for step in steps:
        assert history[step]["reward/rank1"] == pytest.approx(_reward(step, 1))
        assert history[step]["reward/mean"] == pytest.approx(step / 10 + 0.5)
    assert summary["reward/mean"] == pytest.approx(steps[-1] / 10 + 0.5)


# -- against a real collector --------------------------------------------------------------------


def test_one_shot_conversion_of_a_real_run(tmp_path):
    """A finished run converts to TensorBoard scalars and a W&B offline run with every step, and a
    second conversion rebuilds the TensorBoard directory instead of doubling it."""
    _need("tensorboard")
    _need("wandb")
    with running_collector(tmp_path, "--run-id", "oneshot") as (_, info):
        _publish(info["endpoint"], range(30), "oneshot")
    for flags in (["--tensorboard", "--wandb"], ["--tensorboard"]):
        result = subprocess.run(_sink_command(tmp_path, *flags), env=_sink_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "30 steps" in result.stderr, result.stderr
        _check_tensorboard(tmp_path, range(30))  # the second pass: still one point per step
    _check_wandb(tmp_path, range(30), "oneshot")


def test_follow_exports_while_the_run_goes_on_and_exits_when_the_collector_does(tmp_path):
    """With --follow, steps show up in TensorBoard while ranks still publish; when the collector
    finishes the sink drains the log, closes both sinks and exits 0 on its own."""
    _need("tensorboard")
    _need("wandb")
    with running_collector(tmp_path, "--run-id", "live") as (collector, info):
        sink = subprocess.Popen(_sink_command(tmp_path, "--tensorboard", "--wandb", "--follow"),
                                env=_sink_env(tmp_path), stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            monitors = [Monitor(RankConfig(rank=r, world_size=WORLD, endpoint=info["endpoint"],
                                           run_id="live"), info["endpoint"]) for r in range(WORLD)]
            try:
                for step in range(20):
                    for rank, mon in enumerate(monitors):
                        mon.log(step, {"reward": _reward(step, rank), "kl": _kl(step)})
                # both ranks are at step 19, so every step before it is complete and exported
                wait_for(lambda: 18 in _tensorboard_scalars(tmp_path / "tensorboard").get(
                    "reward/mean", {}), 30, "step 18 in TensorBoard while the run goes on")
                assert sink.poll() is None
                for step in range(20, 40):
                    for rank, mon in enumerate(monitors):
                        mon.log(step, {"reward": _reward(step, rank), "kl": _kl(step)})
            finally:
                for mon in monitors:
                    mon.close()
            assert stop_process(collector) == 0
            _, stderr = sink.communicate(timeout=30)
        finally:
            stop_process(sink)
    assert sink.returncode == 0, stderr
    assert "40 steps" in stderr and "0 duplicate" in stderr, stderr
    _check_tensorboard(tmp_path, range(40))
    _check_wandb(tmp_path, range(40), "live")


def test_sigterm_ends_a_follow_with_everything_read_so_far_written(tmp_path):
    """SIGTERM makes a following sink drain the log, write every pending step and exit 0, while
    the collector goes on."""
    _need("tensorboard")
    with running_collector(tmp_path) as (_, info):
        sink = subprocess.Popen(_sink_command(tmp_path, "--tensorboard", "--follow"),
                                env=_sink_env(tmp_path), stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            _publish(info["endpoint"], range(5))
            wait_for(lambda: 3 in _tensorboard_scalars(tmp_path / "tensorboard").get(
                "reward/mean", {}), 30, "step 3 in TensorBoard")
            sink.send_signal(signal.SIGTERM)
            _, stderr = sink.communicate(timeout=30)
        finally:
            stop_process(sink)
        assert sink.returncode == 0, stderr
    _check_tensorboard(tmp_path, range(5))


def test_a_stop_decision_reaches_both_sinks(tmp_path):
    """A STOP_STATE record becomes TensorBoard text at the stop step and W&B summary fields."""
    _need("tensorboard")
    _need("wandb")
    log = EventLog(tmp_path)
    log.append(_batch(0, 1, [0, 1], [[0.5], [0.6]]))
    log.append(wire.encode(wire.envelope(Kind.STOP_STATE, "r", -1, 0, gen=1, at=14, reason="KL too high",
                                         sev="CRITICAL", t=1700000002.0, src="detector:kl_high")))
    log.close()
    result = subprocess.run(_sink_command(tmp_path, "--tensorboard", "--wandb"),
                            env=_sink_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "2 steps, 1 stops" in result.stderr, result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    [event] = accumulator.Tensors("rlmon/stop")
    assert event.step == 14 and b"KL too high" in event.tensor_proto.string_val[0]
    _, _, summary = _wandb_run(tmp_path)
    assert summary["rlmon/stop_at_step"] == 14 and summary["rlmon/stop_reason"] == "KL too high"


def test_ranks_never_import_the_sink_packages():
    """`import rlmon`, init() and log() pull in neither tensorboard nor wandb."""
    script = ("import sys, rlmon\n"
              "mon = rlmon.init(endpoint='tcp://127.0.0.1:1')\n"
              "mon.log(0, {'a': 1.0}); mon.close()\n"
              "print(sorted({'tensorboard', 'wandb', 'exporters'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the pieces, on logs written here --------------------------------------------------------------


def _batch(rank: int, seq: int, steps: list[int], rows: list[list], keys=("reward",), inc: int = 7) -> bytes:
    return wire.encode(wire.envelope(Kind.BATCH, "r", rank, inc, seq=seq, t=1700000000.0,
                                     step=steps[-1], blocks=[[list(keys), steps,
                                                              [1700000000.0 + s for s in steps], rows]]))


def _hello(rank: int, world: int, inc: int = 7) -> bytes:
    return wire.encode(wire.envelope(Kind.HELLO, "r", rank, inc, world=world, local_rank=rank,
                                     pid=1, host="h"))


def test_tail_waits_for_a_partly_written_record_and_never_rereads(tmp_path):
    """Bytes of a record still being written are held back until it is whole; records already
    read are not read again."""
    first, second = _batch(0, 1, [0], [[1.0]]), _batch(0, 2, [1], [[2.0]])
    log = EventLog(tmp_path)
    log.append(first)
    log.commit()
    path = tmp_path / FILE_NAME
    tail = EventLogTail(path)
    assert [m.fields["seq"] for m in tail.poll()] == [1]
    whole = struct.pack("<II", len(second), zlib.crc32(second)) + second
    written = 0
    with open(path, "ab") as file:
        for cut in (3, 11, len(whole) - 1):  # the header, then the payload, arriving in pieces
            file.write(whole[written:cut])
            file.flush()
            written = cut
            assert list(tail.poll()) == [] and tail.pending_bytes == cut
        file.write(whole[written:])
    assert [m.fields["seq"] for m in tail.poll()] == [2]
    assert (tail.records, tail.pending_bytes, tail.offset) == (2, 0, path.stat().st_size)
    tail.close()
    log.close()


def test_tail_stops_at_a_corrupt_record_and_counts_its_bytes(tmp_path):
    """A record whose checksum fails is never trusted: reading stops before it."""
    log = EventLog(tmp_path)
    for seq in (1, 2):
        log.append(_batch(0, seq, [seq], [[float(seq)]]))
    log.close()
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    tail = EventLogTail(path)
    assert [m.fields["seq"] for m in tail.poll()] == [1]
    assert tail.corrupt and tail.pending_bytes == len(_batch(0, 2, [2], [[2.0]])) + 8
    with open(path, "ab") as file:  # records after the corruption are not trusted either
        file.write(struct.pack("<II", 1, zlib.crc32(b"x")) + b"x")
    assert list(tail.poll()) == [] and tail.records == 1


def test_tail_refuses_a_file_that_is_not_an_event_log(tmp_path):
    """Another file under the log's name is an error, not an empty run."""
    (tmp_path / FILE_NAME).write_bytes(b"hello world, not a log")
    with pytest.raises(Exception, match="not an rlmon event log"):
        list(EventLogTail(tmp_path / FILE_NAME).poll())


def test_assembler_waits_for_every_rank_and_drops_resent_batches():
    """A step is released once both ranks moved past it, once; a re-sent batch is not counted twice."""
    assembler = StepAssembler()
    for frame in (_hello(0, 2), _hello(1, 2), _batch(0, 1, [0, 1], [[1.0], [2.0]])):
        assembler.feed(wire.decode(frame))
    assert assembler.ready() == []  # rank 1 has not logged step 0 yet
    assembler.feed(wire.decode(_batch(1, 1, [0, 1], [[3.0], [math.nan]], inc=8)))
    assembler.feed(wire.decode(_batch(1, 1, [0, 1], [[3.0], [math.nan]], inc=8)))  # re-sent
    assembler.feed(wire.decode(_batch(0, 2, [2], [[5.0]])))
    [row] = assembler.ready()  # step 1 waits: rank 1 has not moved past it
    assert (row.step, row.values) == (0, {"reward": {0: 1.0, 1: 3.0}})
    assert row_scalars(row) == {"reward/rank0": 1.0, "reward/rank1": 3.0, "reward/mean": 2.0}
    assembler.feed(wire.decode(_batch(1, 2, [2], [[6.0]], inc=8)))
    [row] = assembler.ready()
    assert row_scalars(row)["reward/mean"] == 2.0  # NaN from rank 1 is left out of the mean
    assert [r.step for r in assembler.flush()] == [2]
    assert assembler.duplicates == 1 and assembler.late_values == 0


def test_assembler_does_not_wait_for_a_rank_that_said_goodbye_or_fell_behind():
    """A rank gone with BYE is not waited for; a silent one only up to the pending horizon."""
    assembler = StepAssembler(max_pending_steps=3)
    for frame in (_hello(0, 2), _hello(1, 2), _batch(0, 1, [0, 1, 2, 3, 4], [[0.0]] * 5)):
        assembler.feed(wire.decode(frame))
    assert [r.step for r in assembler.ready()] == [0]  # 4 - 3: only step 0 is past the horizon
    assembler.feed(wire.decode(wire.encode(wire.envelope(Kind.BYE, "r", 1, 7, seq=0, step=0))))
    assert [r.step for r in assembler.ready()] == [1, 2, 3]
    assembler.feed(wire.decode(_batch(1, 1, [1], [[9.0]])))  # too late: step 1 is out
    assert assembler.late_values == 1


def test_a_missing_package_names_the_extra_to_install(tmp_path):
    """Without tensorboard or wandb the sink exits 2 naming the extra to install, before reading."""
    shadow = tmp_path / "shadow"
    for package in ("tensorboard", "wandb"):  # packages that fail to import, first on the path
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    EventLog(tmp_path).close()
    env = child_env()
    env["PYTHONPATH"] = f"{shadow}{os.pathsep}{env['PYTHONPATH']}"
    for flag, extra in (("--tensorboard", "tensorboard"), ("--wandb", "wandb")):
        result = subprocess.run(_sink_command(tmp_path, flag), env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert f"pip install 'rlmon[{extra}]'" in result.stderr, result.stderr
    assert not (tmp_path / "tensorboard").exists()


def test_collector_watch_sees_a_dead_collector_and_a_fresh_report(tmp_path):
    """Finished: the collector's process is gone, or its report has stood for the grace period."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not process_alive(gone.pid)
    assert CollectorWatch(tmp_path, gone.pid).finished()
    now = [100.0]
    (tmp_path / "collector.json").write_text(json.dumps({"pid": os.getpid(), "started_at": 1.0}))
    watch = CollectorWatch(tmp_path, grace=5.0, clock=lambda: now[0])
    assert not watch.finished()
    (tmp_path / "training_report.json").write_text("{}")
    assert not watch.finished()
    now[0] += 5.0
    assert watch.finished()


def test_collector_watch_ignores_a_report_from_an_earlier_collector(tmp_path):
    """A training_report.json older than the followed collector's start does not end the follow."""
    (tmp_path / "training_report.json").write_text("{}")
    (tmp_path / "collector.json").write_text(json.dumps({"pid": os.getpid(),
                                                         "started_at": 4_000_000_000.0}))
    watch = CollectorWatch(tmp_path, grace=0.0)
    assert not watch.finished()


def test_sink_options_are_validated():
    """Bad settings are refused when the options are built."""
    with pytest.raises(ValueError, match="poll-interval"):
        SinkOptions(poll_interval=0)
    with pytest.raises(ValueError, match="max-pending-steps"):
        SinkOptions(max_pending_steps=0)


class _RecordingSink:
    name = "recording"

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}
        self.closed = False

    def write_step(self, step, wall_time, scalars):
        self.steps[step] = scalars

    def write_stop(self, stop):
        pass

    def flush(self):
        pass

    def close(self):
        self.closed = True


class _FailingSink(_RecordingSink):
    name = "failing"

    def write_step(self, step, wall_time, scalars):
        raise OSError("disk full")


def test_a_failing_sink_is_switched_off_and_the_other_carries_on(tmp_path, monkeypatch):
    """One sink raising costs that sink only: the other gets every step, the error is reported."""
    import exporters.sinks

    log = EventLog(tmp_path)
    log.append(_batch(0, 1, [0, 1, 2], [[0.0], [1.0], [2.0]]))
    log.close()
    good, bad = _RecordingSink(), _FailingSink()
    monkeypatch.setattr(exporters.sinks, "open_sinks", lambda *a, **k: [bad, good])
    stats = exporters.sinks.run_sinks(tmp_path, tensorboard=True)
    assert sorted(good.steps) == [0, 1, 2] and good.closed
    assert stats.failed == {"failing": "OSError: disk full"} and stats.steps == 3
