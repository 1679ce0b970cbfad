"""The per-node relay (``rlmon relay``, ZeroMQ's proxy) with real processes: a 2-rank torchrun job
whose ranks reach the collector only through a relay is acknowledged step by step and stopped at
one step; a collector killed and restarted behind the relay gets every step it had not
acknowledged again; malformed routes are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq

from rlmon import wire
from rlmon.wire import Kind
from tests.integration.helpers import (TOY_TRAINER, child_env, free_port, read_json,
                                       rlmon_command, running_collector, sample_value, scrape,
                                       scrape_until, stop_process, torchrun_command, wait_for)

FAULT_RANK = Path(__file__).resolve().parent / "fault_rank.py"


def _verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*rlmon_command(), "verify", str(out), "--require-bye"],
                          env=child_env(), capture_output=True, text=True, timeout=120)


def _start_relay(collector_endpoint: str, ready_file: Path) -> tuple[subprocess.Popen, str]:
    relay = subprocess.Popen([*rlmon_command(), "relay", "--collector", collector_endpoint,
                              "--ready-file", str(ready_file)], env=child_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    info = wait_for(lambda: read_json(ready_file) or (relay.poll() is not None and {}), 60,
                    "the relay's ready file")
    assert info, f"the relay exited with {relay.returncode}: {relay.stderr.read()}"
    return relay, info["endpoint"]


def test_a_torchrun_job_behind_a_relay_is_acknowledged_and_stopped_at_one_step(tmp_path):
    """rlmon launch → rlmon relay → torchrun (2 ranks): every frame reaches the collector via
    the relay, the KL stop reaches both ranks at the same step, and verify proves every step
    acknowledged."""
    out = tmp_path / "run"
    job = subprocess.Popen([*rlmon_command(), "launch", "--no-top", "--out", str(out), "--",
                            *rlmon_command(), "relay", "--",
                            *torchrun_command(2), str(TOY_TRAINER),
                            "--out", str(tmp_path / "ranks"),
                            "--steps", "400", "--kl-spike-at", "30", "--step-seconds", "0.005"],
                           env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = job.communicate(timeout=300)
    finally:
        stop_process(job)
    assert job.returncode == 0, output
    assert "rlmon relay: ranks connect to" in output
    ranks = [read_json(tmp_path / "ranks" / f"rank{r}.json") for r in (0, 1)]
    report = read_json(out / "training_report.json")
    stop_at = report["summary"]["stop"]["stop_at_step"]
    assert ranks[0]["last_step"] == ranks[1]["last_step"] == stop_at, (ranks, report["summary"])
    assert "KL" in ranks[0]["reason"] and "KL" in ranks[1]["reason"]
    received = sum(report["collector"]["frames_received"].values())
    assert report["collector"]["relayed_frames"] == received > 0  # nothing came around the relay
    verdict = _verify(out)
    print("through a relay:\n" + verdict.stdout)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_a_collector_restarted_behind_a_relay_gets_what_it_had_not_acknowledged(tmp_path):
    """kill -9 of the collector while a rank logs through a relay; a new collector on the same
    directory and address: the relay reconnects, re-binds so the rank reconnects and re-sends, and
    verify passes with the rank closed. The relay then ends cleanly on SIGTERM."""
    out, endpoint = tmp_path / "run", f"tcp://127.0.0.1:{free_port()}"
    flags = ("--endpoint", endpoint, "--run-id", "relayed")
    with running_collector(out, *flags) as (first, info):
        relay, relay_endpoint = _start_relay(endpoint, tmp_path / "relay.json")
        try:
            rank = subprocess.Popen(
                [sys.executable, str(FAULT_RANK), "--out", str(tmp_path), "--steps", "1500",
                 "--step-seconds", "0.004"],
                env=child_env(RLMON_ENDPOINT=relay_endpoint, RLMON_RUN_ID="relayed", RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
            try:
                scrape_until(info["metrics_url"], lambda t: (sample_value(
                    t, "rlmon_rank_last_step", rank="0") or 0) > 100, 120, "the rank past step 100")
                text = scrape(info["metrics_url"])
                assert sample_value(text, "rlmon_relays") == 1
                assert (sample_value(text, "rlmon_frames_relayed_total") or 0) > 0
                os.kill(first.pid, signal.SIGKILL)
                first.wait(30)
                with running_collector(out, *flags):
                    output, _ = rank.communicate(timeout=180)
                    assert rank.returncode == 0, output
            finally:
                stop_process(rank)
            relay.send_signal(signal.SIGTERM)
            relay_log = relay.communicate(timeout=60)[1]
        finally:
            stop_process(relay)
    assert relay.returncode == 0, relay_log
    assert "is back (reconnection 1)" in relay_log, relay_log
    assert read_json(tmp_path / "rank0.json")["last_step"] == 1499
    verdict = _verify(out)
    print("collector restarted behind a relay:\n" + verdict.stdout)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_routes_a_collector_refuses(tmp_path):
    """A multi-part message is refused as bad_framing unless it comes from a relay's id with one
    rank id in front of the frame; a relayed HEARTBEAT is accepted and its rank appears."""
    with running_collector(tmp_path) as (_, info):
        context = zmq.Context()
        plain = context.socket(zmq.DEALER)
        relay = context.socket(zmq.DEALER)
        relay.setsockopt(zmq.ROUTING_ID, wire.RELAY_ID_PREFIX + b"test")
        try:
            for sock in (plain, relay):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(info["endpoint"])
            heartbeat = wire.encode(wire.envelope(Kind.HEARTBEAT, "r", 5, 1, step=7, t=1.0))
            plain.send_multipart([b"rank-id", heartbeat])          # not a relay
            relay.send_multipart([b"a", b"b", heartbeat])          # two ids in front
            relay.send_multipart([b"", heartbeat])                 # an empty rank id
            relay.send_multipart([b"x" * 256, heartbeat])          # past ZeroMQ's 255 bytes
            relay.send_multipart([b"rank-id", heartbeat])          # a proper relayed frame
            text = scrape_until(info["metrics_url"], lambda t: sample_value(
                t, "rlmon_rank_last_step", rank="5") == 7, 30, "the relayed heartbeat")
            text = scrape_until(info["metrics_url"], lambda t: sample_value(
                t, "rlmon_frames_rejected_total", reason="bad_framing") == 4, 30, "4 refusals")
            assert sample_value(text, "rlmon_frames_relayed_total") == 1
        finally:
            plain.close(linger=0)
            relay.close(linger=0)
            context.term()


def test_a_relay_without_a_collector_holds_and_closes_promptly():
    """With no collector listening, a rank behind the relay keeps its batches unacknowledged and
    both the rank's close and the relay's close are bounded."""
    import rlmon
    from rlmon.config import RankConfig
    from rlmon.relay import Relay

    relay = Relay(f"tcp://127.0.0.1:{free_port()}")
    endpoint = relay.start()
    mon = None
    try:
        mon = rlmon.Monitor(RankConfig(rank=0, world_size=1, endpoint=endpoint, run_id="r",
                                       close_timeout=0.5), endpoint)
        for step in range(50):
            mon.log(step, {"loss": float(step)})
        wait_for(lambda: mon.statistics()["unacked"] == 50 or None, 30, "50 steps held")
    finally:
        if mon is not None:
            mon.close()
        assert relay.close(timeout=5.0)
    assert not relay.running
    assert mon.statistics()["acked"] == 0
