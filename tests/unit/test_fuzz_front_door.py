"""A bounded sample of the front-door fuzzer (``benchmarks/fuzz.py``; the long run is recorded in
docs/operations.md): hostile frames through the real decoder and collector state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fuzz  # noqa: E402


@pytest.mark.parametrize("seed", [11, 12])
def test_hostile_frames_are_refused_and_counted_never_raised(seed):
    """3,000 mutated, bombed, flooded and forged frames: no exception escapes, every refusal is
    counted by reason, series stay within the limit, no keyless operator stop is accepted."""
    result = fuzz.run(3000, seed)
    refused = sum(result["decoder_rejections"].values()) + sum(result["state_rejections"].values())
    handled = sum(result["accepted_by_kind"].values())
    assert refused > 1000 and handled > 500
    assert {"malformed", "not_a_map", "bad_version", "unknown_kind", "wrong_type"} <= set(
        result["decoder_rejections"])
    assert {"bad_control_key", "bad_rank", "series_limit"} <= set(result["state_rejections"])
    assert result["series"] <= fuzz.MAX_SERIES


def test_every_generator_runs():
    """The generators cover the hostile cases the issue lists, oversize included."""
    names = {name for name, _ in fuzz.inputs(50_000, 3)}
    assert names >= {"flip", "truncate", "splice", "length_bomb", "deep_nesting", "ext_type",
                     "wrong_field", "unknown_kind", "name_flood", "rank_flood", "forged_stop",
                     "random", "valid", "oversize"}
