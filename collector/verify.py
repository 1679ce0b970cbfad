"""``rlmon verify DIR``: prove from the event log that nothing a rank logged went missing.

Every rank incarnation keeps a ledger of its ``log`` calls (``rlmon.publisher.Ledger``) and sends
it with every batch and with its goodbye (BYE), both of which the collector writes into the event
log. For each incarnation this module checks:

1. **Balance** — ``emitted == acknowledged + dropped + unacknowledged + queued``: every step the
   rank queued is acknowledged by the collector, counted as dropped (by reason), held unsent or
   unacknowledged at exit, or still queued. Read from the BYE's ledger when the rank closed, else
   from the last batch it sent (the rank was killed or is still running).
2. **Acknowledged means logged, once** — the steps in the logged batches numbered up to the
   acknowledged sequence number add up to the ledger's ``acked``, and no batch appears twice.

The verdict is per incarnation; :func:`verify` returns them and ``main`` exits 1 when any check
fails (2 when the directory holds no readable log). Incarnations that never said goodbye are
checked on their last ledger and reported as such; ``--require-bye`` makes that a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.eventlog import FILE_NAME, ReadResult, read_records
from rlmon import wire
from rlmon.errors import FrameRejected
from rlmon.publisher import NON_STEP_DROPS
from rlmon.wire import Kind



@dataclass(slots=True)
class Incarnation:
    """What the log shows of one ``(rank, incarnation)``."""

    rank: int
    inc: int
    steps_by_seq: dict[int, int] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    ledger: dict[str, Any] | None = None
    said_bye: bool = False

    def add_batch(self, seq: int, steps: int, ledger: Any) -> None:
        """A logged batch: its sequence number, how many steps it carried, its ledger."""
        if seq in self.steps_by_seq:
            self.duplicates.append(seq)
        else:
            self.steps_by_seq[seq] = steps
        if not self.said_bye and isinstance(ledger, dict):
            self.ledger = ledger


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checks of one incarnation: ``ok``, and a line per problem in ``problems``."""

    rank: int
    inc: int
    said_bye: bool
    emitted: int
    acked: int
    dropped: int
    unacked: int
    queued: int
    logged_steps: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return not self.problems


def read_incarnations(out_dir: Path) -> tuple[dict[tuple[int, int], Incarnation], ReadResult]:
    """Every incarnation's logged batches and last ledger, from ``out_dir``'s event log."""
    path = Path(out_dir) / FILE_NAME
    results: list[ReadResult] = []
    found: dict[tuple[int, int], Incarnation] = {}
    for payload in read_records(path, results):
        try:
            message = wire.decode(payload)
        except FrameRejected:
            continue
        if message.kind not in (Kind.BATCH, Kind.BYE) or message.rank < 0:
            continue
        key = (message.rank, message.inc)
        incarnation = found.setdefault(key, Incarnation(message.rank, message.inc))
        if message.kind is Kind.BATCH:
            steps = sum(len(block.steps) for block in message.fields["blocks"])
            incarnation.add_batch(message.fields["seq"], steps, message.fields.get("ledger"))
        else:
            ledger = message.fields.get("ledger")
            incarnation.ledger = ledger if isinstance(ledger, dict) else incarnation.ledger
            incarnation.said_bye = True
    return found, results[0] if results else ReadResult(0, 0)


def judge(incarnation: Incarnation, require_bye: bool = False) -> Verdict:
    """Apply the two checks to one incarnation."""
    ledger = incarnation.ledger or {}
    emitted, acked = _count(ledger, "emitted"), _count(ledger, "acked")
    unacked, queued = _count(ledger, "unacked"), _count(ledger, "queued")
    acked_seq = _count(ledger, "acked_seq")
    dropped_by = ledger.get("dropped") if isinstance(ledger.get("dropped"), dict) else {}
    dropped = sum(_count(dropped_by, reason) for reason in dropped_by if reason not in NON_STEP_DROPS)
    logged = sum(steps for seq, steps in incarnation.steps_by_seq.items() if seq <= acked_seq)
    problems = []
    if incarnation.ledger is None:
        problems.append("no ledger in the log (a rank older than the ledger, or a foreign sender)")
    elif emitted != acked + dropped + unacked + queued:
        problems.append(f"emitted {emitted} != acknowledged {acked} + dropped {dropped} + "
                        f"unacknowledged {unacked} + queued {queued}")
    if incarnation.ledger is not None and logged != acked:
        problems.append(f"the rank holds {acked} steps acknowledged up to batch {acked_seq}, "
                        f"the log holds {logged}")
    if incarnation.duplicates:
        problems.append(f"batches logged more than once: {sorted(set(incarnation.duplicates))[:10]}")
    if require_bye and not incarnation.said_bye:
        problems.append("never said goodbye (killed, or still running)")
    return Verdict(incarnation.rank, incarnation.inc, incarnation.said_bye, emitted, acked, dropped,
                   unacked, queued, logged, tuple(problems))


def verify(out_dir: Path, require_bye: bool = False) -> tuple[list[Verdict], ReadResult]:
    """Verdicts for every incarnation in ``out_dir``'s log, by rank then incarnation."""
    found, read = read_incarnations(out_dir)
    return [judge(found[key], require_bye) for key in sorted(found)], read


def _count(mapping: dict, key: str) -> int:
    value = mapping.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def format_table(verdicts: list[Verdict], read: ReadResult) -> str:
    """A markdown table of the verdicts, and the log's own state."""
    lines = [f"event log: {read.records} records"
             + (f", a torn tail of {read.skipped_bytes} bytes skipped" if read.skipped_bytes else ""),
             "", "| rank | incarnation | closed | emitted | acknowledged | dropped | unacknowledged "
             "| queued | logged | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        verdict = "ok" if v.ok else "FAIL: " + "; ".join(v.problems)
        lines.append(f"| {v.rank} | {v.inc} | {'yes' if v.said_bye else 'no'} | {v.emitted} | "
                     f"{v.acked} | {v.dropped} | {v.unacked} | {v.queued} | {v.logged_steps} | "
                     f"{verdict} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rlmon verify``."""
    parser.add_argument("out", type=Path, metavar="DIR", help="the run directory")
    parser.add_argument("--require-bye", action="store_true",
                        help="fail for a rank that never said goodbye (killed or still running)")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")


def run(args: argparse.Namespace) -> int:
    """``rlmon verify``: print the verdicts; 0 when all hold (or no rank logged), 1 when one
    fails, 2 without a readable log."""
    path = Path(args.out) / FILE_NAME
    if not path.exists():
        print(f"rlmon verify: no event log at {path}", file=sys.stderr)
        return 2
    try:
        verdicts, read = verify(args.out, args.require_bye)
    except ValueError as exc:
        print(f"rlmon verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{**{name: getattr(v, name) for name in v.__slots__}, "ok": v.ok}
                          for v in verdicts], indent=2))
    else:
        print(format_table(verdicts, read))
    if not verdicts:
        print("no rank logged anything: nothing to verify")
    return 0 if all(v.ok for v in verdicts) else 1
