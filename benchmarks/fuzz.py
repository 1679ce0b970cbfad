"""Fuzz the collector's front door: the wire decoder and the state machine behind it.

Feeds ``--inputs`` hostile frames to :func:`rlmon.wire.decode` and every frame that decodes to
:meth:`collector.state.CollectorState.handle`, as the receive loop does, and checks that

* nothing but :class:`~rlmon.errors.FrameRejected` ever leaves the decoder, and ``handle`` never
  raises;
* every refusal is counted by reason (decoder reasons, plus the state's own: duplicate, bad_rank,
  bad_control_key, series_limit, ...);
* the state stays bounded: series within ``max_series``, rank table within the rank limit, and
  the process's memory growth is reported;
* no operator stop is accepted without the control key.

Inputs come from a seed corpus of valid frames of every kind (plain and packed blocks, samples,
reward values, queries, stop requests) through mutations — byte flips, truncation, splices,
inflated msgpack length headers (allocation bombs), deep nesting, ext types, oversize frames,
wrong types, NaN/Inf, unknown kinds and versions, floods of distinct metric names, forged and
replayed stop commands — chosen by a seeded generator, so a run is reproducible.

Usage::

    python benchmarks/fuzz.py --inputs 100000 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402

from collector.state import MAX_RANKS, CollectorState, StateConfig  # noqa: E402
from rlmon import wire  # noqa: E402
from rlmon.errors import FrameRejected  # noqa: E402
from rlmon.wire import Kind  # noqa: E402

RUN = "fuzz"
CONTROL_KEY = "k" * 32
MAX_SERIES = 512


def seed_corpus() -> list[dict]:
    """Valid message maps of every kind a collector receives."""
    block = [["reward", "kl", "loss"], [1, 2], [1000.0, 1000.1], [[0.5, 0.01, 1.0], [0.6, 0.02, 0.9]]]
    packed = wire.pack_block(*block)
    return [
        wire.envelope(Kind.HELLO, RUN, 0, 7, world=2, local_rank=0, pid=1, host="h"),
        wire.envelope(Kind.BATCH, RUN, 0, 7, seq=1, t=1000.0, step=2, blocks=[block]),
        wire.envelope(Kind.BATCH, RUN, 1, 9, seq=1, t=1000.0, step=2, blocks=[packed],
                      samples=[[2, ["p"], ["r"], [1.0]]], rv=[[2, "fmt", [1.0, 0.0, None]]],
                      ledger={"emitted": 2, "dropped": {"full": 1}, "sent": 1}),
        wire.envelope(Kind.HEARTBEAT, RUN, 0, 7, step=2, t=1000.2),
        wire.envelope(Kind.STOP_ACK, RUN, 0, 7, gen=1, step=2, ok=True),
        wire.envelope(Kind.STOP_REQUEST, RUN, -1, 0, reason="operator", sev="CRITICAL", key=CONTROL_KEY),
        wire.envelope(Kind.STOP_REQUEST, RUN, 0, 7, reason="rank asks", sev="WARNING"),
        wire.envelope(Kind.QUERY, RUN, 0, 7, q="metrics", id=3, args={"n": 5}),
        wire.envelope(Kind.BYE, RUN, 0, 7, seq=1, step=2),
    ]


# -- mutations ---------------------------------------------------------------------------------

def flip_bytes(rng: random.Random, frame: bytes) -> bytes:
    """Overwrite 1-8 random bytes."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def truncate(rng: random.Random, frame: bytes) -> bytes:
    """Cut the frame short (or drop its head)."""
    cut = rng.randrange(len(frame))
    return frame[:cut] if rng.random() < 0.7 else frame[cut:]


def splice(rng: random.Random, frame: bytes, other: bytes) -> bytes:
    """Join the head of one frame to the tail of another."""
    return frame[:rng.randrange(len(frame))] + other[rng.randrange(len(other)):]


def length_bomb(rng: random.Random, frame: bytes) -> bytes:
    """Insert a str/bin/array/map header declaring up to 4 GB of content."""
    header = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]) + rng.randbytes(2) + b"\xff\xff"
    at = rng.randrange(len(frame))
    return frame[:at] + header + frame[at:]


def deep_nesting(rng: random.Random) -> bytes:
    """Arrays nested thousands deep, inside or instead of a map."""
    depth = rng.choice([100, 1000, 100_000])
    return b"\x91" * depth + b"\x00"


def ext_type(rng: random.Random, frame: bytes) -> bytes:
    """An ext value where a map or a field value belongs."""
    ext = b"\xd4" + bytes([rng.randrange(256)]) + b"\x00"
    return ext if rng.random() < 0.3 else frame[:-1] + ext


def oversize(rng: random.Random) -> bytes:
    """A frame one byte past the limit."""
    return b"\x80" + b"\x00" * wire.MAX_FRAME_BYTES


def wrong_field(rng: random.Random, message: dict) -> bytes:
    """Replace one field with a value of another type, NaN/Inf, or a huge number."""
    message = dict(message)
    key = rng.choice(list(message))
    message[key] = rng.choice([None, True, "x" * rng.randint(0, 300), -1, 2**63 - 1, -(2**63), 2**63,
                               2**64 - 1,
                               math.nan, math.inf, [], {}, [1, [2, [3]]], b"\x00" * 9, 1.5])
    return msgpack.packb(message, use_bin_type=True)


def unknown_kind_or_version(rng: random.Random, message: dict) -> bytes:
    """A kind or a version nobody speaks."""
    message = dict(message)
    if rng.random() < 0.5:
        message["k"] = rng.choice([0, 13, 99, -1, 2**40, "BATCH"])
    else:
        message["v"] = rng.choice([0, 2, -1, None, "1", 1.0])
    return msgpack.packb(message, use_bin_type=True)


def name_flood(rng: random.Random) -> bytes:
    """A batch of many distinct metric names (series must stay bounded)."""
    keys = [f"flood/{rng.getrandbits(48):x}" for _ in range(rng.randint(50, 400))]
    rank = rng.randrange(4)
    block = wire.pack_block(keys, [rng.randrange(100)], [1000.0], [[1.0] * len(keys)])
    return wire.encode(wire.envelope(Kind.BATCH, RUN, rank, rng.getrandbits(31),
                                     seq=rng.randint(1, 10**6), t=1000.0, step=1, blocks=[block]))


def rank_flood(rng: random.Random) -> bytes:
    """A valid batch from an absurd rank number or a random incarnation."""
    rank = rng.choice([MAX_RANKS, MAX_RANKS - 1, 10**9, -2, rng.randrange(64)])
    block = [["reward"], [rng.choice([rng.randrange(10**6), 2**63, 2**64 - 1])], [1000.0], [[rng.random()]]]
    return wire.encode(wire.envelope(Kind.BATCH, RUN, rank, rng.getrandbits(31),
                                     seq=rng.randint(1, 10**6), t=1000.0, step=1, blocks=[block]))


def forged_stop(rng: random.Random) -> bytes:
    """An operator stop with no key, a wrong key, another run's id, or a replayed generation."""
    fields = {"reason": "forged", "sev": "CRITICAL"}
    choice = rng.randrange(4)
    if choice == 1:
        fields["key"] = "wrong" + "k" * 27
    elif choice == 2:
        fields["key"] = rng.choice([None, 7, b"k" * 32, ""])
    run = RUN if choice != 3 else "other-run"
    if choice == 3:
        return wire.encode(wire.envelope(Kind.STOP_STATE, run, -1, 0, gen=1, at=1, reason="replayed",
                                         sev="CRITICAL"))
    return msgpack.packb(wire.envelope(Kind.STOP_REQUEST, run, -1, 0, **fields), use_bin_type=True)


def random_bytes(rng: random.Random) -> bytes:
    """Plain noise."""
    return rng.randbytes(rng.randint(0, 256))


def inputs(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``(generator name, frame)`` pairs, reproducible from ``seed``."""
    rng = random.Random(seed)
    corpus = seed_corpus()
    frames = [wire.encode(m) for m in corpus]
    generators: list[tuple[str, Callable[[], bytes]]] = [
        ("flip", lambda: flip_bytes(rng, rng.choice(frames))),
        ("truncate", lambda: truncate(rng, rng.choice(frames))),
        ("splice", lambda: splice(rng, rng.choice(frames), rng.choice(frames))),
        ("length_bomb", lambda: length_bomb(rng, rng.choice(frames))),
        ("deep_nesting", lambda: deep_nesting(rng)),
        ("ext_type", lambda: ext_type(rng, rng.choice(frames))),
        ("wrong_field", lambda: wrong_field(rng, rng.choice(corpus))),
        ("unknown_kind", lambda: unknown_kind_or_version(rng, rng.choice(corpus))),
        ("name_flood", lambda: name_flood(rng)),
        ("rank_flood", lambda: rank_flood(rng)),
        ("forged_stop", lambda: forged_stop(rng)),
        ("random", lambda: random_bytes(rng)),
        ("valid", lambda: rng.choice(frames)),
    ]
    for index in range(count):
        if index % 50_000 == 49_999:
            yield "oversize", oversize(rng)
            continue
        name, generate = generators[index % len(generators)]
        yield name, generate()


# -- the run -----------------------------------------------------------------------------------

def run(count: int, seed: int) -> dict:
    """Fuzz; return the outcome counts. Raises AssertionError on a broken invariant."""
    state = CollectorState(StateConfig(run_id=RUN, world_size=2, max_series=MAX_SERIES,
                                       control_key=CONTROL_KEY, capacity=64))
    decoder_rejections: collections.Counter[str] = collections.Counter()
    accepted: collections.Counter[str] = collections.Counter()
    rss_start = _rss_mib()
    started = time.perf_counter()
    for index, (generator, frame) in enumerate(inputs(count, seed)):
        try:
            message = wire.decode(frame)
        except FrameRejected as exc:
            decoder_rejections[exc.reason] += 1
            continue
        before = state.stop.state
        state.handle(message, b"fuzz", 1000.0 + index * 1e-3)
        accepted[message.kind.name] += 1
        _check_invariants(state, message, before)
    return {"inputs": count, "seed": seed, "seconds": time.perf_counter() - started,
            "decoder_rejections": dict(decoder_rejections), "accepted_by_kind": dict(accepted),
            "state_rejections": dict(state.rejected_by_reason),
            "values_flagged": dict(state.flagged_by_reason), "series": state.store.series_count,
            "ranks": len(state.ranks.ranks), "rss_start_mib": rss_start,
            "rss_end_mib": _rss_mib(), "stop": state.stop.state}


def _check_invariants(state: CollectorState, message: wire.Message, stop_before) -> None:
    assert state.store.series_count <= MAX_SERIES
    assert len(state.ranks.ranks) <= MAX_RANKS
    if message.kind is Kind.STOP_REQUEST and message.rank < 0 and state.stop.state is not stop_before:
        assert message.fields.get("key") == CONTROL_KEY, "operator stop accepted without the key"


def _rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = run(args.inputs, args.seed)
    print(f"# {result['inputs']:,} inputs, seed {result['seed']}, {result['seconds']:.1f} s; "
          f"peak RSS {result['rss_start_mib']:.0f} → {result['rss_end_mib']:.0f} MiB; "
          f"{result['series']} series (limit {MAX_SERIES}), {result['ranks']} ranks")
    print("\n| outcome | count |\n|---|---|")
    for reason, n in sorted(result["decoder_rejections"].items()):
        print(f"| refused by the decoder: {reason} | {n:,} |")
    for reason, n in sorted(result["state_rejections"].items()):
        print(f"| refused by the state: {reason} | {n:,} |")
    for kind, n in sorted(result["accepted_by_kind"].items()):
        print(f"| decoded and handled: {kind} | {n:,} |")
    for reason, n in sorted(result["values_flagged"].items()):
        print(f"| values flagged: {reason} | {n:,} |")
    print(f"\nStop in force at the end: {result['stop']}")
    print("No exception escaped; every invariant held.")


if __name__ == "__main__":
    main()
