"""The wire protocol: test vectors from docs/protocol.md, validation, hostile frames."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmon import wire
from rlmon.errors import FrameRejected
from rlmon.wire import Kind

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _vectors() -> dict[str, bytes]:
    """The hex test vectors of docs/protocol.md, by name."""
    text = PROTOCOL_DOC.read_text()
    found = re.findall(r"<!-- vector: (\w+) -->\s*```\s*([0-9a-f\s]+?)```", text)
    return {name: bytes.fromhex("".join(body.split())) for name, body in found}


def test_protocol_doc_has_the_three_vectors():
    """docs/protocol.md carries the hello, batch and stop vectors."""
    assert set(_vectors()) >= {"hello", "batch", "stop"}


def test_hello_vector_encodes_byte_for_byte():
    """Encoding the documented HELLO gives exactly the documented bytes."""
    message = wire.envelope(Kind.HELLO, "run1", 0, 7, world=2, local_rank=0, pid=4242,
                            host="node0", t=1700000000.5)
    assert wire.encode(message) == _vectors()["hello"]


def test_batch_vector_encodes_and_decodes():
    """The documented BATCH round-trips: bytes match and decode to the same columnar block."""
    message = wire.envelope(
        Kind.BATCH, "run1", 1, 7, seq=3, t=1700000001.0, step=11,
        blocks=[[["reward", "kl"], [10, 11], [1700000000.75, 1700000000.875],
                 [[0.5, 0.01], [0.75, 0.02]]]],
        samples=[], ledger={"emitted": 12, "dropped": {}, "sent": 3})
    assert wire.encode(message) == _vectors()["batch"]
    decoded = wire.decode(_vectors()["batch"])
    assert decoded.kind is Kind.BATCH and decoded.rank == 1 and decoded.inc == 7
    block = decoded.fields["blocks"][0]
    assert block.keys == ["reward", "kl"] and block.steps.tolist() == [10, 11]
    assert block.values == [[0.5, 0.01], [0.75, 0.02]]


def test_packed_batch_vector_encodes_and_decodes():
    """The documented packed BATCH is what the publisher's packing gives, and decodes to the
    same block as the plain vector."""
    block = wire.pack_block(["reward", "kl"], [10, 11], [1700000000.75, 1700000000.875],
                            [[0.5, 0.01], [0.75, 0.02]])
    message = wire.envelope(Kind.BATCH, "run1", 1, 7, seq=3, t=1700000001.0, step=11,
                            blocks=[block], ledger={"emitted": 12, "dropped": {}, "sent": 3})
    assert wire.encode(message) == _vectors()["batch_packed"]
    packed = wire.decode(_vectors()["batch_packed"]).fields["blocks"][0]
    plain = wire.decode(_vectors()["batch"]).fields["blocks"][0]
    assert packed.packed and not plain.packed
    assert packed.steps.tolist() == plain.steps.tolist() and packed.times.tolist() == plain.times.tolist()
    assert packed.values.tolist() == plain.values


def test_stop_vector_decodes():
    """The documented STOP_STATE decodes to generation 1, stop at step 14."""
    decoded = wire.decode(_vectors()["stop"])
    assert decoded.kind is Kind.STOP_STATE
    assert (decoded.fields["gen"], decoded.fields["at"]) == (1, 14)
    assert decoded.fields["reason"] == "KL too high"


def test_unknown_fields_are_ignored():
    """A newer sender's extra fields do not make a frame invalid."""
    message = wire.envelope(Kind.HEARTBEAT, "r", 0, 1, step=3, t=1.0, future_field={"x": 1})
    assert wire.decode(wire.encode(message)).fields["step"] == 3


@pytest.mark.parametrize("frame, reason", [
    (b"", "malformed"),
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2, 3]), "not_a_map"),
    (msgpack.packb({"v": 2, "k": 7}), "bad_version"),
    (msgpack.packb({"v": True, "k": 7}), "bad_version"),
    (msgpack.packb({"v": 1, "k": 99}), "unknown_kind"),
    (msgpack.packb({"v": 1, "k": "BATCH"}), "unknown_kind"),
    (msgpack.packb({"v": 1, "k": 7, "run": "r", "rank": 0}), "missing_field"),
    (msgpack.packb({"v": 1, "k": 7, "run": "r", "rank": "0", "inc": 1, "step": 1, "t": 1.0}),
     "wrong_type"),
    (msgpack.packb({"v": 1, "k": 7, "run": "r", "rank": 0, "inc": 1, "step": True, "t": 1.0}),
     "wrong_type"),
    (msgpack.packb({1: 2}), "malformed"),
    (msgpack.packb({"v": 1}) + b"\x00", "malformed"),
    (msgpack.packb(msgpack.ExtType(5, b"boom")), "malformed"),
])
def test_bad_frames_are_rejected_with_a_reason(frame, reason):
    """Each kind of bad frame is refused with the reason the collector counts."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(frame)
    assert caught.value.reason == reason


def _batch(**overrides):
    fields = dict(seq=1, t=1.0, step=0, blocks=[[["a"], [0], [1.0], [[1.0]]]])
    fields.update(overrides)
    return wire.encode(wire.envelope(Kind.BATCH, "r", 0, 1, **fields))


def test_numbers_outside_int64_and_empty_blocks_are_refused():
    """A plain step past int64 or an empty block is a bad_block; an envelope integer past
    int64 is a wrong_type (nothing downstream has to handle them)."""
    for blocks in ([[["a"], [2**63], [1.0], [[1.0]]]], [[["a"], [], [], []]]):
        with pytest.raises(FrameRejected) as caught:
            wire.decode(_batch(blocks=blocks))
        assert caught.value.reason == "bad_block"
    with pytest.raises(FrameRejected) as caught:
        wire.decode(_batch(step=2**64 - 1))
    assert caught.value.reason == "wrong_type"


@pytest.mark.parametrize("blocks", [
    [[["a"], [0], [1.0]]],                       # three parts
    [[["a"], [0, 1], [1.0], [[1.0]]]],           # lengths differ
    [[["a", "a"], [0], [1.0], [[1.0, 2.0]]]],    # duplicate keys
    [[[""], [0], [1.0], [[1.0]]]],               # empty key
    [[["a"], [0.5], [1.0], [[1.0]]]],            # float step
    [[["a"], [0], [float("nan")], [[1.0]]]],     # NaN time
    [[["a"], [0], [1.0], [[1.0, 2.0]]]],         # row too long
    [[[1], [0], [1.0], [[1.0]]]],                # non-string key
    ["not a block"],
])
def test_bad_blocks_are_rejected(blocks):
    """Malformed columnar blocks are refused as bad_block."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(_batch(blocks=blocks))
    assert caught.value.reason == "bad_block"


_I8, _F8 = struct.Struct("<q"), struct.Struct("<d")


def _packed(keys, steps, times, values):
    return [keys, b"".join(_I8.pack(x) for x in steps), b"".join(_F8.pack(x) for x in times),
            b"".join(_F8.pack(x) for row in values for x in row)]


def test_packed_block_decodes_to_arrays():
    """A packed block (little-endian bin columns) decodes to the same steps, times and values
    as the plain form, NaN and Inf included."""
    block = _packed(["a", "b"], [3, 4], [1.5, 2.5], [[1.0, math.nan], [math.inf, -2.0]])
    assert block == wire.pack_block(["a", "b"], [3, 4], [1.5, 2.5], [[1.0, math.nan], [math.inf, -2.0]])
    decoded = wire.decode(_batch(blocks=[block])).fields["blocks"][0]
    assert decoded.packed and decoded.steps.tolist() == [3, 4] and decoded.times.tolist() == [1.5, 2.5]
    assert decoded.values.shape == (2, 2) and decoded.values[0, 0] == 1.0
    assert math.isnan(decoded.values[0, 1]) and decoded.values[1, 0] == math.inf


@pytest.mark.parametrize("block", [
    [["a"], b"\x00" * 8, b"\x00" * 8, b"\x00" * 16],              # values too long
    [["a"], b"\x00" * 7, b"\x00" * 8, b"\x00" * 8],               # steps not whole int64s
    [["a"], b"\x00" * 8, b"\x00" * 16, b"\x00" * 8],              # times longer than steps
    [["a"], [0], [1.0], b"\x00" * 8],                             # plain steps, packed values
    [["a", "a"], b"\x00" * 8, b"\x00" * 8, b"\x00" * 16],          # duplicate keys
    ["a", b"\x00" * 8, b"\x00" * 8, b"\x00" * 8],                 # keys not an array
    _packed(["a"], [0], [math.nan], [[1.0]]),                     # NaN time
    _packed(["a"], [0], [math.inf], [[1.0]]),                     # Inf time
    [["a"], b"\x00" * 8 * 70000, b"\x00" * 8 * 70000, b"\x00" * 8 * 70000],  # too many steps
])
def test_bad_packed_blocks_are_rejected(block):
    """A packed block whose columns disagree, or with bad keys or times, is a bad_block."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(_batch(blocks=[block]))
    assert caught.value.reason == "bad_block"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=4), max_size=4), st.binary(max_size=64),
       st.binary(max_size=64), st.binary(max_size=128))
def test_random_packed_columns_never_crash_the_decoder(keys, steps, times, values):
    """Random bin columns are either a valid packed block or a counted bad_block."""
    try:
        block = wire.decode(_batch(blocks=[[keys, steps, times, values]])).fields["blocks"][0]
    except FrameRejected as exc:
        assert exc.reason == "bad_block"
    else:
        assert block.values.shape == (len(steps) // 8, len(keys))


def test_nan_and_inf_values_pass_the_decoder():
    """NaN/Inf metric values are data (the collector flags them), not a malformed frame."""
    decoded = wire.decode(_batch(blocks=[[["a", "b"], [0], [1.0], [[math.nan, math.inf]]]]))
    assert math.isnan(decoded.fields["blocks"][0].values[0][0])


def test_oversize_frames_are_rejected_before_parsing():
    """A frame past MAX_FRAME_BYTES is refused without being decoded."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(b"\x80" * (wire.MAX_FRAME_BYTES + 1))
    assert caught.value.reason == "oversize"


def test_huge_declared_length_does_not_allocate():
    """A header that declares a 4 GB string in a tiny frame is malformed, not an allocation."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(b"\xdb\xff\xff\xff\xff" + b"x" * 10)
    assert caught.value.reason == "malformed"


def test_deep_nesting_is_refused_cleanly():
    """Pathologically nested arrays are rejected without a crash."""
    frame = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(FrameRejected):
        wire.decode(frame)


def test_samples_must_match_in_length():
    """A samples entry with fewer responses than prompts is refused."""
    with pytest.raises(FrameRejected):
        wire.decode(_batch(samples=[[0, ["p1", "p2"], ["r1"], None]]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(frame):
    """Any byte string either decodes to a Message or raises FrameRejected."""
    try:
        assert isinstance(wire.decode(frame), wire.Message)
    except FrameRejected as exc:
        assert exc.reason


_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "k", "run", "rank", "inc", "seq", "t", "step", "blocks",
                                        "samples", "world", "gen", "at", "ok", "reason", "sev"]),
                       _values, max_size=12))
def test_structured_garbage_never_crashes_the_decoder(fields):
    """Maps with the right keys and random values are validated, never crash."""
    fields.setdefault("v", 1)
    try:
        wire.decode(msgpack.packb(fields))
    except FrameRejected as exc:
        assert exc.reason


@pytest.mark.parametrize("parts, expected", [
    ([b"id", b"frame"], ((b"id",), b"frame")),
    ([b"rlmon-relay/n1", b"rank", b"frame"], ((b"rlmon-relay/n1", b"rank"), b"frame")),
    ([b"rlmon-relay/n1", b"r" * 255, b"frame"], ((b"rlmon-relay/n1", b"r" * 255), b"frame")),
])
def test_split_route_accepts_direct_and_relayed_messages(parts, expected):
    """[id, frame] from any peer; [relay id, rank id, frame] from a relay's id."""
    assert wire.split_route(parts) == expected


@pytest.mark.parametrize("parts", [
    [b"frame"],
    [b"id", b"rank", b"frame"],                                # not a relay's id
    [b"rlmon-relay/n1", b"", b"frame"],                        # empty rank id
    [b"rlmon-relay/n1", b"r" * 256, b"frame"],                 # past ZeroMQ's 255 bytes
    [b"rlmon-relay/n1", b"relay2", b"rank", b"frame"],         # two hops
])
def test_split_route_refuses_other_envelopes(parts):
    """Every other shape is bad_framing."""
    with pytest.raises(FrameRejected) as caught:
        wire.split_route(parts)
    assert caught.value.reason == "bad_framing"
