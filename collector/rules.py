"""Rules: they turn detector scores into alerts and actions.

Detectors (:mod:`collector.detectors`) only compute :class:`Score` values. A :class:`Rule` says
what a score means: the thresholds of each severity (INFO, WARNING, CRITICAL; ``*_above`` or
``*_below``), how long the condition must hold (``for_steps`` and/or ``for_seconds``: patience),
how long to stay quiet after alerting at the same level (``cooldown_steps``), and what to do at
CRITICAL (``action``: ``alert``, ``checkpoint`` or ``stop``). :class:`RuleEngine` keeps the
per-(rule, subject) state and reports which alerts are firing. Everything takes the clock as an
argument.

Rules come from :data:`DEFAULT_RULES`, a TOML or YAML file (``[rules.<detector>]`` tables) and
``--rule detector.key=value`` flags, validated by :func:`load_rules`, which names the bad key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from collector import kernels
from collector.snapshot import Alert
from rlmon.errors import ConfigError

INFO, WARNING, CRITICAL = "INFO", "WARNING", "CRITICAL"
SEVERITIES = (INFO, WARNING, CRITICAL)
_LEVEL = {None: 0, INFO: 1, WARNING: 2, CRITICAL: 3}
ACTIONS = ("alert", "checkpoint", "stop")


@dataclass(frozen=True, slots=True)
class Score:
    """One measurement by a detector: ``value`` of ``detector`` for ``subject`` at ``step``.

    ``subject`` is what the score is about (a metric name, ``rank 3``); ``alert_type`` is the name
    an alert from it carries (``KL_HIGH``, ``OUTLIER``...); ``describe`` is a short phrase for the
    message, e.g. ``"KL divergence"``."""

    detector: str
    alert_type: str
    subject: str
    step: int
    value: float
    describe: str = ""
    rank: int = -1


@dataclass(frozen=True, slots=True)
class ScoreSeries:
    """Scores of one detector for one subject at several steps (a block scored at once):
    ``values[i]`` at ``steps[i]``, steps ascending; the other fields as in :class:`Score`."""

    detector: str
    alert_type: str
    subject: str
    steps: np.ndarray
    values: np.ndarray
    describe: str = ""
    rank: int = -1

    def at(self, index: int) -> Score:
        """The score at position ``index`` as a :class:`Score`."""
        return Score(self.detector, self.alert_type, self.subject, int(self.steps[index]),
                     float(self.values[index]), self.describe, self.rank)


@dataclass(kw_only=True, slots=True)
class Rule:
    """How the scores of one detector become alerts."""

    enabled: bool = True
    """A disabled rule never alerts (its detector still scores)."""
    info_above: float | None = None
    warning_above: float | None = None
    critical_above: float | None = None
    info_below: float | None = None
    warning_below: float | None = None
    critical_below: float | None = None
    for_steps: int = 1
    """Consecutive scores that must breach a level before it alerts."""
    for_seconds: float = 0.0
    """Seconds a level must have been breached before it alerts."""
    cooldown_steps: int = 10
    """After an alert, the same level alerts again only this many steps later."""
    action: str = "alert"
    """What a CRITICAL alert does: ``alert``, ``checkpoint`` or ``stop``."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError("action", f"must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.for_steps < 1:
            raise ConfigError("for_steps", "must be >= 1")
        if self.for_seconds < 0 or self.cooldown_steps < 0:
            raise ConfigError("for_seconds", "for_seconds and cooldown_steps must be >= 0")
        for name in _THRESHOLD_KEYS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value}")

    def level(self, value: float) -> str | None:
        """The highest severity whose threshold ``value`` breaches (None when none does)."""
        if not self.enabled or not math.isfinite(value):
            return None
        for severity in (CRITICAL, WARNING, INFO):
            above = getattr(self, f"{severity.lower()}_above")
            below = getattr(self, f"{severity.lower()}_below")
            if (above is not None and value > above) or (below is not None and value < below):
                return severity
        return None

    def thresholds(self) -> np.ndarray:
        """The thresholds in :data:`collector.kernels.THRESHOLD_SLOTS` order, NaN where unset,
        or None when the rule is disabled (what :func:`collector.kernels.rule_levels` reads)."""
        if not self.enabled:
            return None
        return np.array([math.nan if getattr(self, slot) is None else getattr(self, slot)
                         for slot in kernels.THRESHOLD_SLOTS], dtype=np.float64)

    def threshold(self, severity: str) -> float:
        """The threshold of ``severity`` (the ``_above`` one when both are set; NaN if none)."""
        above = getattr(self, f"{severity.lower()}_above")
        below = getattr(self, f"{severity.lower()}_below")
        return above if above is not None else below if below is not None else math.nan


_THRESHOLD_KEYS = tuple(f"{s.lower()}_{d}" for s in SEVERITIES for d in ("above", "below"))


#: The built-in rules, one per detector (see docs/detectors.md for what each score means).
DEFAULT_RULES: dict[str, Rule] = {
    "kl": Rule(warning_above=0.1, critical_above=0.2, action="stop"),
    "kl_acceleration": Rule(warning_above=3.0, for_steps=3),
    "nan": Rule(critical_above=0.0, cooldown_steps=100),
    "reward_hacking": Rule(warning_above=0.3, critical_above=0.6, for_steps=3),
    "forgetting": Rule(warning_below=0.7, critical_below=0.5),
    "entropy_collapse": Rule(warning_below=0.1, for_steps=5),
    "zero_std_groups": Rule(warning_above=0.9, for_steps=5),
    "length_blowup": Rule(warning_above=2.0, for_steps=3),
    "clip_fraction": Rule(warning_above=0.3, for_steps=5),
    "grad_norm_spike": Rule(warning_above=10.0),
    "loss_rising": Rule(info_above=3.0, for_steps=5, cooldown_steps=50),
    "reward_outlier": Rule(warning_above=3.0),
    "reward_drop": Rule(warning_above=0.5),
    "reward_spike": Rule(warning_above=2.0),
    "reward_flatline": Rule(warning_above=0.95),
    "reward_negative": Rule(warning_above=0.9),
    "straggler": Rule(warning_above=1.5, for_seconds=10.0, cooldown_steps=100),
    "rank_silent": Rule(critical_above=60.0, cooldown_steps=10**9),
    "rank_stuck": Rule(warning_above=300.0, cooldown_steps=10**9),
    "events_dropped": Rule(warning_above=0.0, cooldown_steps=100),
}


def kl_rule(kl_threshold: float) -> Rule:
    """The seeds' KL rule: WARNING above ``kl_threshold``, CRITICAL (stop) above twice it."""
    if not (math.isfinite(kl_threshold) and kl_threshold > 0):
        raise ConfigError("kl_threshold", f"must be a positive number, got {kl_threshold}")
    return replace(DEFAULT_RULES["kl"], warning_above=kl_threshold, critical_above=2 * kl_threshold)


@dataclass(frozen=True, slots=True)
class Finding:
    """An alert and the action it asks for (``alert``, ``checkpoint`` or ``stop``)."""

    alert: Alert
    action: str = "alert"


@dataclass(slots=True)
class _RuleState:
    streak_level: str | None = None
    streak: int = 0
    breached_since: float = math.nan
    alerted_level: str | None = None
    alerted_step: int = -(10**18)


@dataclass(slots=True)
class RuleEngine:
    """Applies rules to scores; remembers streaks, cooldowns and what is firing."""

    rules: Mapping[str, Rule] = field(default_factory=lambda: dict(DEFAULT_RULES))
    _state: dict[tuple[str, str], _RuleState] = field(default_factory=dict)
    firing: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    """(detector, subject) → (alert type, severity) for every condition holding right now."""
    _thresholds: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate_series(self, series: ScoreSeries, now: float) -> list[Finding]:
        """Judge a block of scores in step order; the same findings as :meth:`evaluate` on each.

        Scores that breach no threshold only reset the streak, so a block with no breach costs
        one kernel call; from the first breach on, scores are judged one by one."""
        thresholds = self._thresholds.get(series.detector)
        if thresholds is None:
            rule = self.rules.get(series.detector)
            if rule is None or not rule.enabled:
                return []
            thresholds = self._thresholds[series.detector] = rule.thresholds()
        levels = np.empty(series.values.size, np.int8)
        first = kernels.rule_levels(series.values, thresholds, levels)
        key = (series.detector, series.subject)
        if first != 0:
            self._reset(key)
        if first < 0:
            return []
        findings = [self.evaluate(series.at(i), now) for i in range(first, series.values.size)]
        return [f for f in findings if f is not None]

    def _reset(self, key: tuple[str, str]) -> None:
        """What a score breaching nothing does: no streak, not firing, nothing alerted."""
        self.firing.pop(key, None)
        state = self._state.get(key)
        if state is not None:
            state.streak_level, state.streak, state.breached_since = None, 0, math.nan
            state.alerted_level = None

    def evaluate(self, score: Score, now: float) -> Finding | None:
        """Judge one score; return the finding when it should alert now."""
        rule = self.rules.get(score.detector)
        if rule is None:
            return None
        key = (score.detector, score.subject)
        state = self._state.setdefault(key, _RuleState())
        level = rule.level(score.value)
        self._track(state, level, now)
        if level is None:
            self.firing.pop(key, None)
            state.alerted_level = None
            return None
        if state.streak < rule.for_steps or now - state.breached_since < rule.for_seconds:
            return None
        self.firing[key] = (score.alert_type, level)
        rising = _LEVEL[level] > _LEVEL[state.alerted_level]
        cooled = score.step - state.alerted_step >= rule.cooldown_steps
        if not (rising or cooled):
            return None
        state.alerted_level, state.alerted_step = level, score.step
        action = rule.action if level == CRITICAL else "alert"
        return Finding(_alert(score, rule, level, now), action)

    @staticmethod
    def _track(state: _RuleState, level: str | None, now: float) -> None:
        """Count consecutive scores at (or above) the current level; note when the breach began."""
        if level is None:
            state.streak_level, state.streak, state.breached_since = None, 0, math.nan
            return
        if state.streak_level is None:
            state.breached_since = now
        state.streak = state.streak + 1 if state.streak_level is not None else 1
        state.streak_level = level


def _alert(score: Score, rule: Rule, level: str, now: float) -> Alert:
    limit = rule.threshold(level)
    relation = "above" if getattr(rule, f"{level.lower()}_above") is not None else "below"
    what = score.describe or score.detector.replace("_", " ")
    message = f"{score.alert_type}: {what} {score.value:.4g} {relation} {limit:.4g} ({score.subject})"
    return Alert(score.step, level, score.alert_type, score.subject, float(score.value),
                 float(limit), message, now, score.rank)


# -- configuration ---------------------------------------------------------------------------------

_RULE_KEYS = {f.name for f in fields(Rule)}


def load_rules(path: Path | None = None, overrides: Iterable[str] = (),
               base: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
    """Rules from :data:`DEFAULT_RULES` (or ``base``), then a TOML/YAML file, then
    ``detector.key=value`` overrides. Raises :class:`ConfigError` naming the bad key."""
    rules = dict(DEFAULT_RULES if base is None else base)
    if path is not None:
        document = _read_document(Path(path))
        tables = document.get("rules", {})
        unknown = set(document) - {"rules"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown top-level key in {path} (expected [rules])")
        if not isinstance(tables, dict):
            raise ConfigError("rules", "must be a table of detector names")
        for detector, table in tables.items():
            rules[detector] = _apply(rules, detector, table, f"rules.{detector}")
    for text in overrides:
        detector, key, value = _parse_override(text)
        rules[detector] = _apply(rules, detector, {key: value}, f"--rule {text}")
    return rules


def _apply(rules: Mapping[str, Rule], detector: str, table: Any, where: str) -> Rule:
    if detector not in rules:
        raise ConfigError(where, f"unknown detector {detector!r}; known: {', '.join(sorted(rules))}")
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table of rule settings")
    for key, value in table.items():
        if key not in _RULE_KEYS:
            raise ConfigError(f"{where}.{key}" if "--rule" not in where else where,
                              f"unknown setting {key!r}; known: {', '.join(sorted(_RULE_KEYS))}")
        _check_type(key, value, f"{where}.{key}" if "--rule" not in where else where)
    try:
        return replace(rules[detector], **table)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.key}" if "--rule" not in where else where, str(exc)) from None


def _check_type(key: str, value: Any, where: str) -> None:
    if key == "enabled":
        ok = isinstance(value, bool)
    elif key == "action":
        ok = isinstance(value, str)
    elif key in ("for_steps", "cooldown_steps"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(where, f"wrong type {type(value).__name__} for {key}")


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``kl.critical_above=0.3`` → ("kl", "critical_above", 0.3)."""
    name, sep, raw = text.partition("=")
    detector, dot, key = name.strip().partition(".")
    if not sep or not dot or not detector or not key:
        raise ConfigError(f"--rule {text}", "expected detector.key=value")
    return detector, key, _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", ""):
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def _read_document(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read rules file: {exc}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            document = yaml.safe_load(text) or {}
        else:
            import tomllib
            document = tomllib.loads(text)
    except Exception as exc:
        raise ConfigError(str(path), f"not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(str(path), "the top level must be a table")
    return document
