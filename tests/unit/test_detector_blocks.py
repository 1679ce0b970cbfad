"""The collector scores blocks of completed steps with Numba scans; these tests check that, for
any block sizes, the scores and the rule findings equal those of the slow per-step references
(``reference_detectors.py``, the detectors as first written) on random and edge-case streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collector import detectors as blocks
from collector import kernels
from collector.rules import DEFAULT_RULES, Rule, RuleEngine, Score, ScoreSeries
import reference_detectors as reference


def _streams(seed: int) -> dict[str, list[float]]:
    """Named streams: noise with NaN/Inf holes, constants, zeros, sign flips, jumps, short."""
    rng = np.random.default_rng(seed)
    noisy = rng.normal(1.0, 0.3, 300)
    noisy[rng.choice(300, 20, replace=False)] = np.nan
    noisy[rng.choice(300, 3, replace=False)] = np.inf
    jump = np.concatenate([rng.normal(0.02, 0.002, 150), rng.normal(0.5, 0.05, 60)])
    return {
        "noisy": noisy.tolist(),
        "constant": [2.0] * 120,
        "zeros": [0.0] * 80 + rng.choice([0.0, 1.0, -1.0], 80).tolist(),
        "negative": (-np.abs(rng.normal(1, 1, 150))).tolist(),
        "jump": jump.tolist(),
        "rising": np.linspace(0.0, 5.0, 130).tolist(),
        "short": [1.0, math.nan, 3.0],
        "empty": [],
        "all_nan": [math.nan] * 40,
    }


PAIRS = [
    (lambda: reference.ValueDetector("kl", "KL_HIGH", ["m"], "d"),
     lambda: blocks.ValueDetector("kl", "KL_HIGH", ["m"], "d")),
    (reference.KLAccelerationDetector, blocks.KLAccelerationDetector),
    (lambda: reference.RatioToBaselineDetector("entropy_collapse", "E", ["m"], "d"),
     lambda: blocks.RatioToBaselineDetector("entropy_collapse", "E", ["m"], "d")),
    (lambda: reference.SpikeDetector("grad_norm_spike", "G", ["m"], "d"),
     lambda: blocks.SpikeDetector("grad_norm_spike", "G", ["m"], "d")),
    (reference.TrendDetector, blocks.TrendDetector),
    (lambda: reference.RewardAnomalyDetector(window=100), lambda: blocks.RewardAnomalyDetector(window=100)),
    (lambda: reference.RewardAnomalyDetector(window=20), lambda: blocks.RewardAnomalyDetector(window=20)),
]


class Series:
    """Stored cross-rank series: metric -> (steps, values), oldest first."""

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}
        self.values: dict[str, list[float]] = {}

    def put(self, metric: str, steps, values) -> None:
        self.steps.setdefault(metric, []).extend(int(s) for s in steps)
        self.values.setdefault(metric, []).extend(float(v) for v in values)

    def tail(self, metric: str, n: int):
        steps, values = self.steps.get(metric, []), self.values.get(metric, [])
        start = max(0, len(steps) - n)
        return np.asarray(steps[start:], np.int64), np.asarray(values[start:], np.float64)

    def history_upto(self, step: int):
        def history(metric: str, n: int) -> np.ndarray:
            kept = [v for s, v in zip(self.steps.get(metric, []), self.values.get(metric, [])) if s <= step]
            return np.asarray(kept[-n:] if n else [], np.float64)
        return history


def _key(score: Score):
    return (score.step, score.detector, score.alert_type)


def _reference_scores(detector, metric, values, series: Series) -> list[Score]:
    scores = []
    for step, value in enumerate(values):
        series.put(metric, [step], [value])
        scores += detector.observe(metric, step, value, series.history_upto(step))
    return scores


def _block_scores(detector, metric, values, series: Series, rng) -> list[Score]:
    scores, start = [], 0
    while start < len(values):
        k = int(rng.integers(1, 41))
        chunk = values[start:start + k]
        steps = np.arange(start, start + len(chunk), dtype=np.int64)
        series.put(metric, steps, chunk)
        for out in detector.score(metric, steps, np.asarray(chunk, np.float64), series.tail):
            scores += [out.at(i) for i in range(out.values.size)]
        start += len(chunk)
    return scores


def _assert_same(expected: list[Score], got: list[Score]) -> None:
    expected, got = sorted(expected, key=_key), sorted(got, key=_key)
    assert [_key(s) for s in got] == [_key(s) for s in expected]
    for want, have in zip(expected, got):
        assert have.value == pytest.approx(want.value, rel=1e-9, abs=1e-12, nan_ok=True), _key(want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_block_scores_equal_the_per_step_reference(seed, pair):
    """Every stream, in random block sizes, scores exactly as the per-step reference."""
    make_reference, make_block = PAIRS[pair]
    rng = np.random.default_rng(seed + 100 * pair)
    for name, values in _streams(seed).items():
        expected = _reference_scores(make_reference(), "m", values, Series())
        got = _block_scores(make_block(), "m", values, Series(), rng)
        _assert_same(expected, got)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reward_hacking_blocks_equal_the_reference(seed):
    """Reward hacking with two quality series (one misaligned in steps) and comparator
    similarities scores as the per-step reference, in random block sizes."""
    rng = np.random.default_rng(seed)
    n = 160
    reward = np.cumsum(rng.normal(0.05, 0.2, n))
    reward[rng.choice(n, 8, replace=False)] = np.nan
    quality = {"rewards/format": (np.arange(n), np.where(np.arange(n) < 90, 1.0, 0.3)
                                  + rng.normal(0, 0.05, n)),
               "quality/judge": (np.arange(5, n, 2), rng.normal(1.0, 0.2, len(range(5, n, 2))))}
    similarities = rng.uniform(0.2, 1.0, 40)

    def build(module, series: Series):
        detector = module.RewardHackingDetector(window_size=30, quality=lambda: {"sim": similarities})
        for name, (steps, values) in quality.items():
            detector.watches(name)
            series.put(name, steps, values)
        return detector

    ref_series, block_series = Series(), Series()
    expected = _reference_scores(build(reference, ref_series), "reward", reward.tolist(), ref_series)
    got = _block_scores(build(blocks, block_series), "reward", reward.tolist(), block_series, rng)
    _assert_same(expected, got)
    assert any(s.value > 0 for s in expected)


# -- rules on blocks ----------------------------------------------------------------------------

def test_rule_levels_kernel_matches_rule_level():
    """The vectorised severity codes equal Rule.level on random values and every rule shape."""
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(0, 2, 500), [math.nan, math.inf, -math.inf, 0.0]])
    codes = {None: 0, "INFO": 1, "WARNING": 2, "CRITICAL": 3}
    rules = list(DEFAULT_RULES.values()) + [
        Rule(info_above=0.5, warning_above=1.0, critical_below=-2.0),
        Rule(info_below=0.0, warning_below=-1.0, critical_above=3.0), Rule(enabled=False)]
    for rule in rules:
        thresholds = rule.thresholds()
        if thresholds is None:
            continue

        out = np.empty(values.size, np.int8)
        first = kernels.rule_levels(values, thresholds, out)
        expected = [codes[rule.level(float(v))] for v in values]
        assert out.tolist() == expected
        assert first == next((i for i, c in enumerate(expected) if c), -1)


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_series_equals_evaluate_step_by_step(seed):
    """Findings (step, severity, action), firing state and later behaviour are the same whether
    scores are judged one by one or in blocks."""
    rng = np.random.default_rng(seed)
    rule = Rule(info_above=0.5, warning_above=1.0, critical_above=2.0, for_steps=int(rng.integers(1, 4)),
                cooldown_steps=int(rng.integers(0, 6)), for_seconds=float(rng.choice([0.0, 2.0])),
                action="stop")
    values = np.abs(rng.normal(0.6, 0.8, 400))
    values[rng.choice(400, 10, replace=False)] = np.nan
    one, many = RuleEngine({"x": rule}), RuleEngine({"x": rule})
    expected, got, start = [], [], 0
    while start < values.size:
        k = int(rng.integers(1, 30))
        now = float(start) * 0.5
        chunk = values[start:start + k]
        steps = np.arange(start, start + chunk.size, dtype=np.int64)
        for step, value in zip(steps.tolist(), chunk.tolist()):
            finding = one.evaluate(Score("x", "X", "m", step, value), now)
            if finding is not None:
                expected.append((finding.alert.step, finding.alert.severity, finding.action))
        for finding in many.evaluate_series(ScoreSeries("x", "X", "m", steps, chunk), now):
            got.append((finding.alert.step, finding.alert.severity, finding.action))
        assert many.firing == one.firing
        start += chunk.size
    assert got == expected and expected


def test_evaluate_series_ignores_unknown_and_disabled_rules():
    """No rule, or a disabled one: no findings and nothing firing."""
    engine = RuleEngine({"off": Rule(warning_above=0.0, enabled=False)})
    series = ScoreSeries("off", "X", "m", np.arange(3), np.ones(3))
    assert engine.evaluate_series(series, 0.0) == [] and engine.firing == {}
    unknown = ScoreSeries("nope", "X", "m", np.arange(3), np.ones(3))
    assert engine.evaluate_series(unknown, 0.0) == []
