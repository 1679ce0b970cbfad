"""The wire protocol between training ranks, operators and the collector.

Every message is one ZeroMQ frame holding one msgpack map. ``docs/protocol.md`` is the
specification with byte-level test vectors; this module is its only implementation. Keys are short
because they travel with every batch.

Common fields of every message: ``v`` (protocol version, :data:`PROTOCOL_VERSION`), ``k`` (the
:class:`Kind`), ``run`` (run id, str), ``rank`` (int, -1 for an operator), ``inc`` (incarnation: a
random 31-bit int chosen when a rank's publisher starts, so a restarted or forked process never
collides with its predecessor). Unknown fields are ignored; an unknown version is rejected.

``encode`` turns a map into bytes; ``decode`` turns bytes into a validated :class:`Message` or
raises :class:`~rlmon.errors.FrameRejected` carrying the rejection reason that the collector counts.
No pickle anywhere.
"""

from __future__ import annotations

import array
import enum
import itertools
import math
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from rlmon.errors import FrameRejected

PROTOCOL_VERSION = 1
#: Largest frame the collector accepts; larger ones are refused by ZeroMQ (``ZMQ_MAXMSGSIZE``).
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: A relay's routing id at the collector starts with this (docs/protocol.md, "Relays"): only
#: such a peer may put a rank's routing id in front of the frame.
RELAY_ID_PREFIX = b"rlmon-relay/"
#: ZeroMQ's own limit on a routing id.
MAX_ROUTING_ID_BYTES = 255
#: The ZeroMQ routing frames that reach a peer from the collector's ROUTER: its routing id there,
#: then, behind a relay, its routing id at the relay.
Route = tuple[bytes, ...]
#: Bounds that keep a hostile frame from costing the collector more than its length.
MAX_KEYS_PER_BLOCK = 4096
MAX_STEPS_PER_BLOCK = 65536
MAX_NAME_LENGTH = 256
_BIG_ENDIAN = sys.byteorder == "big"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: Most ``rv`` entries (reward function calls) in one BATCH, and most values in one entry.
MAX_REWARD_ENTRIES = 4096
MAX_REWARD_VALUES = 65536


class Kind(enum.IntEnum):
    """Message kinds. Ranks send HELLO, BATCH, HEARTBEAT, STOP_ACK, STOP_REQUEST and BYE; the
    collector answers with ACK, STOP_STATE and CHECKPOINT_STATE; operators send STOP_REQUEST with
    the control key and receive STOP_STATE or REFUSED. A rank (or an operator) may send QUERY; the
    collector answers that identity with RESULT (read-only, never on the training hot path)."""

    HELLO = 1
    BATCH = 2
    ACK = 3
    STOP_STATE = 4
    STOP_ACK = 5
    STOP_REQUEST = 6
    HEARTBEAT = 7
    BYE = 8
    REFUSED = 9
    CHECKPOINT_STATE = 10
    QUERY = 11
    RESULT = 12


#: Fields every message must carry, with the Python types they must have.
_COMMON_FIELDS = (("run", str), ("rank", int), ("inc", int))

#: Per-kind required fields and their types (checked after the common ones).
_REQUIRED_FIELDS: dict[Kind, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    Kind.HELLO: (("world", int), ("local_rank", int), ("pid", int), ("host", str)),
    Kind.BATCH: (("seq", int), ("t", (int, float)), ("step", int), ("blocks", list)),
    Kind.ACK: (("seq", int),),
    Kind.STOP_STATE: (("gen", int), ("at", int), ("reason", str), ("sev", str)),
    Kind.STOP_ACK: (("gen", int), ("step", int), ("ok", bool)),
    Kind.STOP_REQUEST: (("reason", str), ("sev", str)),
    Kind.HEARTBEAT: (("step", int), ("t", (int, float))),
    Kind.BYE: (("seq", int), ("step", int)),
    Kind.REFUSED: (("why", str),),
    Kind.CHECKPOINT_STATE: (("gen", int), ("at", int), ("reason", str)),
    Kind.QUERY: (("q", str), ("id", int)),
    Kind.RESULT: (("id", int), ("result", dict)),
}


@dataclass(frozen=True, slots=True)
class Block:
    """Steps that share one key set, columnar: ``values[i][j]`` is ``keys[j]`` at ``steps[i]``.

    ``times`` are the ranks' ``time.time()`` at each ``log`` call (Unix seconds). ``steps`` and
    ``times`` are int64 / float64 NumPy arrays. ``values`` is a float64 array of shape
    ``(len(steps), len(keys))`` for a packed block, and the rows as sent (lists of anything, for
    the collector to check) for a plain one."""

    keys: list[str]
    steps: "np.ndarray"
    times: "np.ndarray"
    values: "np.ndarray | list[list[Any]]"

    @property
    def packed(self) -> bool:
        """True when the values arrived as one float64 array (every value a number)."""
        return not isinstance(self.values, list)


def pack_block(keys: list[str], steps: list[int], times: list[float],
               rows: list[list[Any]]) -> list[Any]:
    """The wire form of one block: packed (``bin`` columns of little-endian int64 steps, float64
    times and row-major float64 values) when every value is a number, else plain arrays."""
    try:
        packed_steps = array.array("q", steps)
        packed_times = array.array("d", times)
        packed_values = array.array("d", itertools.chain.from_iterable(rows))
    except (TypeError, OverflowError, ValueError):
        return [keys, steps, times, rows]
    if _BIG_ENDIAN:
        for column in (packed_steps, packed_times, packed_values):
            column.byteswap()
    return [keys, packed_steps.tobytes(), packed_times.tobytes(), packed_values.tobytes()]


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded, validated message: its kind, the sender's identity, and the raw field map."""

    kind: Kind
    run: str
    rank: int
    inc: int
    fields: dict[str, Any]


def split_route(parts: list[bytes]) -> tuple[Route, bytes]:
    """Split a message the collector's ROUTER received into (route, frame). A direct peer's
    message is ``[id, frame]``; a relayed one ``[relay id, rank id, frame]``, accepted only from a
    peer whose id starts with :data:`RELAY_ID_PREFIX` and with a rank id of 1..255 bytes. Anything
    else raises ``FrameRejected("bad_framing")``. Replies go back as ``[*route, reply]``."""
    if len(parts) == 2:
        return (parts[0],), parts[1]
    if (len(parts) == 3 and parts[0].startswith(RELAY_ID_PREFIX)
            and 0 < len(parts[1]) <= MAX_ROUTING_ID_BYTES):
        return (parts[0], parts[1]), parts[2]
    raise FrameRejected("bad_framing")


def encode(fields: dict[str, Any]) -> bytes:
    """Serialise one message map (which must already hold ``v`` and ``k``) to msgpack bytes."""
    return msgpack.packb(fields, use_bin_type=True)


def envelope(kind: Kind, run: str, rank: int, inc: int, **fields: Any) -> dict[str, Any]:
    """Build a message map with the common fields filled in."""
    return {"v": PROTOCOL_VERSION, "k": int(kind), "run": run, "rank": rank, "inc": inc, **fields}


def decode(frame: bytes) -> Message:
    """Parse and validate one frame.

    Raises :class:`FrameRejected` with ``reason`` one of: ``oversize``, ``malformed`` (not msgpack,
    truncated, trailing bytes, ext types, non-str map keys), ``not_a_map``, ``bad_version``,
    ``unknown_kind``, ``missing_field``, ``wrong_type``, ``bad_block``.
    """
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameRejected("oversize", f"frame of {len(frame)} bytes")
    raw = _unpack(frame)
    if not isinstance(raw, dict):
        raise FrameRejected("not_a_map", type(raw).__name__)
    version = raw.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise FrameRejected("bad_version", repr(version)[:32])
    kind = _kind_of(raw.get("k"))
    _check_fields(raw, _COMMON_FIELDS)
    _check_fields(raw, _REQUIRED_FIELDS[kind])
    if kind is Kind.BATCH:
        raw["blocks"] = [_block_of(b) for b in raw["blocks"]]
        _check_samples(raw.get("samples", []))
        _check_reward_values(raw.get("rv", []))
    return Message(kind, raw["run"], raw["rank"], raw["inc"], raw)


def _unpack(frame: bytes) -> Any:
    """msgpack-decode one frame on its own, refusing ext types; any failure is ``malformed``."""
    try:
        return msgpack.unpackb(
            frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext
        )
    except FrameRejected:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, ...)
        raise FrameRejected("malformed", f"{type(exc).__name__}: {exc}"[:120]) from exc


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameRejected("malformed", f"ext type {code}")


def _kind_of(value: Any) -> Kind:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameRejected("unknown_kind", repr(value)[:32])
    try:
        return Kind(value)
    except ValueError:
        raise FrameRejected("unknown_kind", str(value)) from None


def _check_fields(raw: dict[str, Any], spec: tuple[tuple[str, Any], ...]) -> None:
    for name, types in spec:
        if name not in raw:
            raise FrameRejected("missing_field", name)
        value = raw[name]
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            raise FrameRejected("wrong_type", f"{name}: {type(value).__name__}")
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise FrameRejected("wrong_type", f"{name}: outside int64")


def _block_of(raw: Any) -> Block:
    """Validate the shape of one columnar block (plain values are checked by the collector)."""
    if not isinstance(raw, list) or len(raw) != 4:
        raise FrameRejected("bad_block", "a block is [keys, steps, times, values]")
    keys, steps, times, values = raw
    if not steps:
        raise FrameRejected("bad_block", "a block holds at least one step")
    if isinstance(values, bytes):
        return _packed_block_of(keys, steps, times, values)
    if not (isinstance(keys, list) and isinstance(steps, list) and isinstance(times, list)):
        raise FrameRejected("bad_block", "keys, steps and times must be arrays")
    if not isinstance(values, list) or not (len(steps) == len(times) == len(values)):
        raise FrameRejected("bad_block", "steps, times and values differ in length")
    _check_keys(keys, len(steps))
    if not all(_is_int(s) and _INT64_MIN <= s <= _INT64_MAX for s in steps) \
            or not all(_is_real(t) for t in times):
        raise FrameRejected("bad_block", "steps must be int64s and times numbers")
    if not all(isinstance(row, list) and len(row) == len(keys) for row in values):
        raise FrameRejected("bad_block", "each row needs one value per key")
    import numpy as np  # the collector's side only: a training node needs no NumPy

    return Block(keys, np.array(steps, dtype=np.int64), np.array(times, dtype=np.float64), values)


def _packed_block_of(keys: Any, steps: Any, times: Any, values: bytes) -> Block:
    """Validate a packed block: ``bin`` steps (int64), times (float64, finite) and values
    (float64, ``len(steps) × len(keys)``, row-major), all little-endian."""
    if not (isinstance(keys, list) and isinstance(steps, bytes) and isinstance(times, bytes)):
        raise FrameRejected("bad_block", "a packed block has keys then bin steps, times, values")
    n, width = len(steps) // 8, len(keys)
    if len(steps) % 8 or len(times) != 8 * n or len(values) != 8 * n * width:
        raise FrameRejected("bad_block", "packed columns differ in length")
    _check_keys(keys, n)
    import numpy as np  # the collector's side only: a training node needs no NumPy

    step_array = np.frombuffer(steps, dtype="<i8").astype(np.int64)  # copies: writable arrays
    time_array = np.frombuffer(times, dtype="<f8").astype(np.float64)
    if not np.isfinite(time_array).all():
        raise FrameRejected("bad_block", "steps must be ints and times numbers")
    value_array = np.frombuffer(values, dtype="<f8").astype(np.float64)
    return Block(keys, step_array, time_array, value_array.reshape(n, width))


def valid_key(key: Any) -> bool:
    """True for a metric name the collector accepts: a string of 1 to 256 characters."""
    return type(key) is str and 0 < len(key) <= MAX_NAME_LENGTH


def _check_keys(keys: list[Any], n_steps: int) -> None:
    if len(keys) > MAX_KEYS_PER_BLOCK or n_steps > MAX_STEPS_PER_BLOCK:
        raise FrameRejected("bad_block", "too many keys or steps")
    try:
        if tuple(keys) in _VALID_KEY_SETS:
            return  # a rank sends the same key set batch after batch: checked once
    except TypeError:  # an unhashable key (a list, a map): refused below
        pass
    if not all(valid_key(k) for k in keys):
        raise FrameRejected("bad_block", "keys must be non-empty strings")
    if len(set(keys)) != len(keys):
        raise FrameRejected("bad_block", "duplicate keys")
    if len(keys) <= _MAX_CACHED_KEYS:  # a flood of huge random key sets must not fill memory
        if len(_VALID_KEY_SETS) >= _MAX_CACHED_KEY_SETS:
            _VALID_KEY_SETS.clear()
        _VALID_KEY_SETS.add(tuple(keys))


#: Key sets already found valid (at most 512 sets of at most 256 keys: a few MB at worst).
_VALID_KEY_SETS: set[tuple[str, ...]] = set()
_MAX_CACHED_KEY_SETS = 512
_MAX_CACHED_KEYS = 256


def _check_samples(samples: Any) -> None:
    """Samples are ``[step, prompts, responses, rewards-or-nil]`` with matching lengths."""
    if not isinstance(samples, list):
        raise FrameRejected("wrong_type", "samples")
    for entry in samples:
        if not (isinstance(entry, list) and len(entry) == 4 and _is_int(entry[0])):
            raise FrameRejected("bad_block", "a sample entry is [step, prompts, responses, rewards]")
        _, prompts, responses, rewards = entry
        if not (isinstance(prompts, list) and isinstance(responses, list)):
            raise FrameRejected("bad_block", "prompts and responses must be arrays")
        if len(prompts) != len(responses) or not all(isinstance(s, str) for s in prompts + responses):
            raise FrameRejected("bad_block", "prompts and responses must be strings of equal count")
        if rewards is not None and (not isinstance(rewards, list) or len(rewards) != len(prompts)):
            raise FrameRejected("bad_block", "rewards must be nil or one number per sample")


def _check_reward_values(entries: Any) -> None:
    """``rv`` entries are ``[step, name, values]``: the individual values one reward function
    returned at ``step`` (values are checked by the collector, which counts non-numbers)."""
    if not isinstance(entries, list):
        raise FrameRejected("wrong_type", "rv")
    if len(entries) > MAX_REWARD_ENTRIES:
        raise FrameRejected("bad_block", "too many reward value entries")
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and _is_int(entry[0])):
            raise FrameRejected("bad_block", "a reward value entry is [step, name, values]")
        _, name, values = entry
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH):
            raise FrameRejected("bad_block", "a reward function name is a non-empty string")
        if not isinstance(values, list) or len(values) > MAX_REWARD_VALUES:
            raise FrameRejected("bad_block", "reward values must be an array of at most 65536")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
