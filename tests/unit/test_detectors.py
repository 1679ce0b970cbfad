"""Detectors score streams; rules decide. Both driven directly, with an injected clock."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from collector.detectors import (KLAccelerationDetector, RankWatch, RatioToBaselineDetector,
                                 RewardAnomalyDetector, RewardHackingDetector, SampleComparator,
                                 SpikeDetector, ValueDetector, rank_scores)
from collector.ranks import RankTable
from collector.rules import (CRITICAL, DEFAULT_RULES, INFO, WARNING, Rule, RuleEngine, Score,
                             kl_rule, load_rules)
from rlmon.errors import ConfigError


class Streams:
    """A stand-in for the store's cross-rank series: metric -> steps and values."""

    def __init__(self):
        self.data: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}

    def put(self, metric, values, start=0):
        """Store values at steps start, start + 1, ... without scoring them."""
        self.data.setdefault(metric, []).extend(values)
        self.steps.setdefault(metric, []).extend(range(start, start + len(values)))

    def feed(self, detector, metric, values, start=0, block=1):
        """Store the values ``block`` steps at a time, collecting the detector's scores."""
        scores = []
        for offset in range(0, len(values), block):
            chunk = [float(v) for v in values[offset:offset + block]]
            self.put(metric, chunk, start + offset)
            steps = np.arange(start + offset, start + offset + len(chunk), dtype=np.int64)
            for series in detector.score(metric, steps, np.array(chunk), self.tail):
                scores += [series.at(i) for i in range(series.values.size)]
        return scores

    def tail(self, metric, n):
        """The last n (steps, values), oldest first."""
        steps, values = self.steps.get(metric, []), self.data.get(metric, [])
        start = max(0, len(steps) - n)
        return np.asarray(steps[start:], np.int64), np.asarray(values[start:], np.float64)


def _levels(rule, values, for_steps=None, times=None):
    engine = RuleEngine({"x": rule})
    out = []
    for step, value in enumerate(values):
        now = times[step] if times else float(step)
        finding = engine.evaluate(Score("x", "X", "m", step, value), now)
        out.append(None if finding is None else (finding.alert.severity, finding.action))
    return out, engine


# -- rules -------------------------------------------------------------------------------------------

def test_kl_rule_matches_the_seed():
    """KL: WARNING above the threshold, CRITICAL above twice it, and CRITICAL stops."""
    levels, _ = _levels(kl_rule(0.1), [0.05, 0.15, 0.25, 0.3])
    assert levels == [None, (WARNING, "alert"), (CRITICAL, "stop"), None]


def test_patience_needs_consecutive_breaches():
    """for_steps=3 alerts only on the third consecutive breach; a dip resets the streak."""
    levels, _ = _levels(Rule(warning_above=1.0, for_steps=3), [2, 2, 0, 2, 2, 2])
    assert levels == [None, None, None, None, None, (WARNING, "alert")]


def test_for_seconds_uses_the_injected_clock():
    """for_seconds waits on the clock given, not on steps."""
    rule = Rule(warning_above=1.0, for_seconds=10.0)
    levels, _ = _levels(rule, [2, 2, 2], times=[0.0, 5.0, 10.5])
    assert levels == [None, None, (WARNING, "alert")]


def test_cooldown_repeats_at_the_same_level():
    """A level that persists alerts again only every cooldown_steps steps."""
    levels, _ = _levels(Rule(warning_above=1.0, cooldown_steps=3), [2] * 7)
    assert [x is not None for x in levels] == [True, False, False, True, False, False, True]


def test_below_thresholds_and_firing_state():
    """_below thresholds work, and the firing state clears when the value recovers."""
    rule = Rule(warning_below=0.7, critical_below=0.5)
    levels, engine = _levels(rule, [0.9, 0.6, 0.4])
    assert levels == [None, (WARNING, "alert"), (CRITICAL, "alert")]
    assert engine.firing == {("x", "m"): ("X", CRITICAL)}
    engine.evaluate(Score("x", "X", "m", 3, 0.95), 3.0)
    assert engine.firing == {}


def test_info_level_and_nan_scores():
    """INFO thresholds alert at INFO; a NaN score never alerts."""
    levels, _ = _levels(Rule(info_above=1.0, warning_above=5.0), [2.0, math.nan, 6.0])
    assert levels == [(INFO, "alert"), None, (WARNING, "alert")]


def test_disabled_rule_is_silent():
    """enabled=false silences a rule."""
    levels, _ = _levels(Rule(warning_above=0.0, enabled=False), [1.0, 2.0])
    assert levels == [None, None]


def test_rules_load_from_toml_yaml_and_flags(tmp_path):
    """A TOML file, a YAML file and --rule flags all override the defaults."""
    toml = tmp_path / "rules.toml"
    toml.write_text('[rules.kl]\nwarning_above = 0.05\naction = "checkpoint"\n')
    yaml_file = tmp_path / "rules.yaml"
    yaml_file.write_text("rules:\n  entropy_collapse:\n    warning_below: 0.2\n    for_steps: 2\n")
    rules = load_rules(toml, ["kl.critical_above=0.5", "nan.enabled=false"])
    assert (rules["kl"].warning_above, rules["kl"].critical_above) == (0.05, 0.5)
    assert rules["kl"].action == "checkpoint" and rules["nan"].enabled is False
    assert load_rules(yaml_file)["entropy_collapse"].for_steps == 2
    assert rules["reward_outlier"] == DEFAULT_RULES["reward_outlier"]


@pytest.mark.parametrize("text, key", [
    ('[rules.kl]\nwarn_above = 0.1\n', "rules.kl.warn_above"),
    ('[rules.nope]\nwarning_above = 1\n', "rules.nope"),
    ('[rules.kl]\naction = "explode"\n', "rules.kl.action"),
    ('[rules.kl]\nfor_steps = "three"\n', "rules.kl.for_steps"),
    ('[rules.kl]\nfor_steps = 0\n', "rules.kl.for_steps"),
    ('[detectors]\nx = 1\n', "detectors"),
])
def test_bad_rule_files_name_the_bad_key(tmp_path, text, key):
    """Each mistake in a rules file raises ConfigError naming the key."""
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_rules(path)
    assert caught.value.key == key


def test_bad_rule_flag_is_named():
    """A malformed --rule flag is named in the error."""
    with pytest.raises(ConfigError) as caught:
        load_rules(None, ["kl-critical=3"])
    assert "kl-critical=3" in caught.value.key


# -- stream detectors against slow references -------------------------------------------------------

def test_kl_scores_are_the_values():
    """The KL detector's score is the KL value itself."""
    scores = Streams().feed(ValueDetector("kl", "KL_HIGH", ["kl"], "KL"), "kl", [0.1, 0.3])
    assert [s.value for s in scores] == [0.1, 0.3]


def test_reward_outlier_is_the_z_score_against_previous_values():
    """OUTLIER score = |x - mean(previous)| / std(previous), as computed by hand."""
    rng = np.random.default_rng(0)
    values = list(rng.normal(1.0, 0.1, size=30)) + [5.0]
    scores = Streams().feed(RewardAnomalyDetector(window=100), "reward", values)
    outliers = [s for s in scores if s.alert_type == "OUTLIER"]
    previous = values[:-1]
    expected = abs(5.0 - statistics.fmean(previous)) / statistics.pstdev(previous)
    assert outliers[-1].value == pytest.approx(expected)


def test_flatline_and_negative_fractions():
    """FLATLINE and NEGATIVE scores are the fractions of zeros and negatives in the window."""
    values = [0.0] * 19 + [1.0] + [-1.0] * 10
    scores = Streams().feed(RewardAnomalyDetector(window=20), "rewards/fmt", values)
    last = {s.alert_type: s.value for s in scores if s.step == len(values) - 1}
    window = values[-20:]
    assert last["FLATLINE"] == pytest.approx(sum(v == 0 for v in window) / 20)
    assert last["NEGATIVE"] == pytest.approx(sum(v < 0 for v in window) / 20)


def test_drop_and_spike_follow_the_emas():
    """A reward that halves raises the DROP score past 0.5; one that triples raises SPIKE past 2."""
    drop = Streams().feed(RewardAnomalyDetector(), "reward", [10.0] * 60 + [1.0] * 15)
    assert max(s.value for s in drop if s.alert_type == "DROP") > 0.5
    spike = Streams().feed(RewardAnomalyDetector(), "reward", [1.0] * 60 + [10.0] * 15)
    assert max(s.value for s in spike if s.alert_type == "SPIKE") > 2.0


def test_reward_hacking_needs_rising_reward_and_falling_quality():
    """Rising reward with a falling component scores the component's relative fall; a healthy
    run where both rise scores 0."""
    streams = Streams()
    detector = RewardHackingDetector(window_size=20)
    detector.watches("rewards/format")
    streams.put("rewards/format", [1.0 if step < 10 else 0.4 for step in range(20)])
    # recent 10 steps vs the 10 before: reward rose, format fell from 1.0 to 0.4
    scores = streams.feed(detector, "reward", [float(s) for s in range(20)])
    assert scores[-1].value == pytest.approx(0.6)
    healthy = Streams()
    healthy.put("rewards/format", [float(s) for s in range(20)])
    assert healthy.feed(RewardHackingDetector(20), "reward", [float(s) for s in range(20)])[-1].value == 0.0


def test_ratio_to_baseline_for_entropy_and_length():
    """After 10 baseline steps the score is short EMA / baseline mean."""
    detector = RatioToBaselineDetector("entropy_collapse", "ENTROPY_COLLAPSE", ["entropy"], "")
    scores = Streams().feed(detector, "entropy", [1.0] * 10 + [0.05] * 20)
    assert len(scores) == 20 and scores[-1].value == pytest.approx(0.05, rel=1e-3)


def test_grad_norm_spike_against_the_median():
    """A gradient norm 20x its running median scores 20."""
    detector = SpikeDetector("grad_norm_spike", "GRAD_NORM_SPIKE", ["grad_norm"], "")
    scores = Streams().feed(detector, "grad_norm", [1.0] * 20 + [20.0])
    assert scores[-1].value == pytest.approx(20.0)


def test_kl_acceleration_ratio():
    """A KL that jumps tenfold pushes the short/long EMA ratio past 3 within a few steps."""
    scores = Streams().feed(KLAccelerationDetector(), "kl", [0.01] * 30 + [0.1] * 5)
    assert scores[0].value == pytest.approx(1.0) and scores[-1].value > 3.0


# -- samples and ranks -------------------------------------------------------------------------------

def test_sample_comparator_follows_the_seed():
    """Baselines are the first responses; later ones are compared on schedule and summarised."""
    comparator = SampleComparator(sample_size=2, comparison_frequency=5, degradation_threshold=0.7)
    assert comparator.observe(0, ["a", "b", "c"], ["hello world", "foo bar", "x"]) == []
    assert set(comparator.baseline) == {"a", "b"}
    scores = comparator.observe(5, ["a", "b"], ["hello world", "zzzzzzz"])
    assert scores[0].value == pytest.approx((1.0 + 0.0) / 2)
    assert len(comparator.observe(5, ["b"], ["foo bar"])) == 1  # same step: still compared
    assert comparator.observe(6, ["a"], ["different"]) == []  # not due yet
    summary = comparator.get_comparison_summary()
    assert summary["num_comparisons"] == 3 and summary["degraded_count"] == 1
    assert comparator.compute_diff("abc", "abc")["similarity"] == 1.0


def test_rank_scores_silent_stuck_dropped_and_straggler():
    """Silence and stalls are measured on the collector clock; drops are new drops only;
    a rank whose phases take 3x longer than the others' scores 3."""
    ranks = RankTable()
    for rank in (0, 1):
        info = ranks.get(rank)
        info.connect(1, b"x")
        info.last_seen, info.last_step = 100.0, 10
    ranks.get(1).ledger_dropped = {"queue_full": 4}
    watch = RankWatch()
    first = {(s.alert_type, s.rank): s.value for s in rank_scores(ranks, 100.0, {0: 1.0, 1: 3.0}, watch)}
    assert first[("EVENTS_DROPPED", 1)] == 4 and first[("STRAGGLER", 1)] == 3.0
    later = {(s.alert_type, s.rank): s.value for s in rank_scores(ranks, 130.0, {}, watch)}
    assert later[("RANK_SILENT", 0)] == 30.0 and later[("RANK_STUCK", 0)] == 30.0
    assert later[("EVENTS_DROPPED", 1)] == 0.0
