"""``rlmon verify`` on event logs written by the real EventLog: balanced ledgers pass; a lost
acknowledged batch, a duplicate, or an unbalanced ledger fails, each named."""

from __future__ import annotations

from pathlib import Path

from collector.eventlog import EventLog
from collector.verify import verify
from rlmon import wire
from rlmon.cli import main
from rlmon.wire import Kind


def _batch(seq: int, steps: list[int], ledger: dict, rank: int = 0, inc: int = 5) -> bytes:
    block = wire.pack_block(["loss"], steps, [1000.0 + s for s in steps], [[0.5] for _ in steps])
    return wire.encode(wire.envelope(Kind.BATCH, "r", rank, inc, seq=seq, t=1000.0, step=steps[-1],
                                     blocks=[block], ledger=ledger))


def _bye(seq: int, ledger: dict, rank: int = 0, inc: int = 5) -> bytes:
    return wire.encode(wire.envelope(Kind.BYE, "r", rank, inc, seq=seq, step=9, ledger=ledger))


def _ledger(emitted, acked, acked_seq, unacked=0, queued=0, **dropped):
    return {"emitted": emitted, "acked": acked, "acked_seq": acked_seq, "unacked": unacked,
            "queued": queued, "dropped": dropped, "sent": acked_seq}


def _write(tmp_path: Path, frames: list[bytes]) -> Path:
    log = EventLog(tmp_path)
    for frame in frames:
        log.append(frame)
    log.close()
    return tmp_path


def test_a_clean_run_verifies(tmp_path):
    """Two batches of 3 steps, all acknowledged, one step dropped at the queue: ok, exit 0."""
    frames = [_batch(1, [0, 1, 2], _ledger(4, 0, 0, queued=3, queue_full=1)),
              _batch(2, [3, 4, 5], _ledger(7, 3, 1, unacked=0, queued=3, queue_full=1)),
              _bye(2, _ledger(7, 6, 2, queue_full=1))]
    verdicts, _ = verify(_write(tmp_path, frames))
    assert [v.ok for v in verdicts] == [True] and verdicts[0].said_bye
    assert main(["verify", str(tmp_path)]) == 0


def test_an_acknowledged_batch_missing_from_the_log_fails(tmp_path):
    """The rank was told batch 2 is logged, but the log does not hold it."""
    frames = [_batch(1, [0, 1, 2], _ledger(3, 0, 0, queued=3)), _bye(2, _ledger(6, 6, 2))]
    verdicts, _ = verify(_write(tmp_path, frames))
    assert not verdicts[0].ok and "the log holds 3" in verdicts[0].problems[0]
    assert main(["verify", str(tmp_path)]) == 1


def test_a_duplicate_batch_fails(tmp_path):
    """A batch logged twice breaks 'exactly once'."""
    frame = _batch(1, [0], _ledger(1, 0, 0, queued=1))
    verdicts, _ = verify(_write(tmp_path, [frame, frame, _bye(1, _ledger(1, 1, 1))]))
    assert any("more than once" in p for p in verdicts[0].problems)


def test_an_unbalanced_ledger_fails(tmp_path):
    """Emitted steps that are neither acknowledged, dropped, held nor queued are lost."""
    frames = [_batch(1, [0], _ledger(1, 0, 0, queued=1)), _bye(1, _ledger(5, 1, 1))]
    verdicts, _ = verify(_write(tmp_path, frames))
    assert "emitted 5 != acknowledged 1" in verdicts[0].problems[0]


def test_a_killed_rank_is_judged_on_its_last_ledger(tmp_path):
    """No BYE: the last batch's ledger is checked; --require-bye makes it a failure."""
    frames = [_batch(1, [0, 1], _ledger(2, 0, 0, queued=2)),
              _batch(2, [2], _ledger(3, 2, 1, queued=1))]
    verdicts, _ = verify(_write(tmp_path, frames))
    assert verdicts[0].ok and not verdicts[0].said_bye
    assert main(["verify", str(tmp_path), "--require-bye"]) == 1


def test_no_log_is_exit_2(tmp_path):
    """A directory without an event log is a usage error."""
    assert main(["verify", str(tmp_path)]) == 2
