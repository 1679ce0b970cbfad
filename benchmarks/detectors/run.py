"""Labelled scenarios for the detectors: was each fault detected, how fast, and how many false alarms.

One command::

    python benchmarks/detectors/run.py                 # synthetic scenarios (seconds)
    python benchmarks/detectors/run.py --demo          # plus real demo trainings (minutes)

Synthetic scenarios feed a 2-rank run's frames, exactly as ranks send them, into the collector's
state with an injected clock (0.2 s a step): healthy runs with several seeds, and from step 150 on a
KL blow-up, reward hacking through a length exploit, a reward flatline, forgetting of the probe
answers, a NaN loss, a straggler rank, a hung rank. ``--demo`` also runs ``rlmon demo`` healthy and
with its real injected faults (KL blow-up, reward hack) and reads their ``alerts.jsonl``.

For each scenario: the alert types expected, whether one fired, the lead time in steps from the
fault's onset to the first expected alert and to the stop decision, and every other alert. For the
healthy runs: alerts per 1,000 steps by severity. Prints a markdown table (docs/detectors.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from collector.state import CollectorState, StateConfig  # noqa: E402
from rlmon import wire  # noqa: E402
from rlmon.wire import Kind  # noqa: E402

STEPS = 300
ONSET = 150
STEP_SECONDS = 0.2
RANKS = 2
PROBES = ["probe: 1+2=", "probe: 3+4=", "probe: 5+5=", "probe: 9+0="]
ANSWERS = ["<answer>3</answer>", "<answer>7</answer>", "<answer>10</answer>", "<answer>9</answer>"]


@dataclass
class Scenario:
    """A fault (or none) and the alert types that count as detecting it."""

    name: str
    fault: str
    expected: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Outcome:
    """What the detectors did in one scenario."""

    scenario: Scenario
    alerts: list = field(default_factory=list)
    stop_step: int | None = None
    steps: int = STEPS

    def first(self, types: tuple[str, ...]) -> int | None:
        steps = [a["step"] for a in self.alerts if a["type"] in types and a["step"] >= ONSET]
        return min(steps) if steps else None


def metrics_for(step: int, rank: int, fault: str, rng: np.random.Generator) -> dict[str, float]:
    """One rank's scalars at ``step``: a healthy GRPO-like run, bent by ``fault`` from ONSET."""
    on = step >= ONSET and fault != "none"
    progress = step / STEPS
    answer = 0.6 + 1.6 * progress + rng.normal(0, 0.25)
    fmt = 2.95 + rng.normal(0, 0.03)
    length = 19.5 + rng.normal(0, 0.3)
    kl = 0.02 + 0.02 * progress + abs(rng.normal(0, 0.006))
    loss = 0.05 * rng.normal() - 0.01
    rollout = 0.12 + abs(rng.normal(0, 0.01))
    if on and fault == "kl_blowup":
        kl *= 1.6 ** (step - ONSET)
    if on and fault == "length_exploit":
        length *= 1 + 0.05 * (step - ONSET)
        fmt = max(0.0, fmt - 0.08 * (step - ONSET))
        answer += 0.2 * (step - ONSET)
    if on and fault == "flatline":
        answer = 0.0
    if on and fault == "nan_loss" and rank == 1:
        loss = math.nan
    if on and fault == "straggler" and rank == 1:
        rollout *= 3
    return {"reward": fmt + answer, "rewards/match_format_exactly": fmt,
            "rewards/check_answer": answer, "kl": min(kl, 50.0), "loss": loss,
            "entropy": 0.1 * (1 - 0.3 * progress) + abs(rng.normal(0, 0.005)),
            "response_length": length, "frac_reward_zero_std": min(1.0, abs(rng.normal(0.2, 0.1))),
            "clip_fraction": abs(rng.normal(0.003, 0.002)), "grad_norm": abs(rng.normal(0.15, 0.03)),
            "span/rollout": rollout}


def probe_answers(step: int, fault: str) -> list[str]:
    """The probe prompts' answers; after ONSET under ``forgetting`` they drift to digit strings."""
    if fault == "forgetting" and step >= ONSET:
        return ["<0000" + "0" * (step % 7) + "<00000" for _ in ANSWERS]
    return ANSWERS


def run_synthetic(scenario: Scenario) -> Outcome:
    """Feed the scenario's frames into a fresh collector state; return its alerts and stop."""
    state = CollectorState(StateConfig(run_id="bench", world_size=RANKS))
    rng = np.random.default_rng(scenario.seed)
    t0 = 1_000_000.0
    for rank in range(RANKS):
        state.handle(_msg(Kind.HELLO, rank, world=RANKS, local_rank=rank, pid=1, host="h"),
                     b"r%d" % rank, t0)
    seq = [0] * RANKS  # one sequence per rank's incarnation, as a publisher numbers its batches
    for step in range(STEPS):
        now = t0 + step * STEP_SECONDS
        for rank in range(RANKS):
            if scenario.fault == "hung_rank" and rank == 1 and step >= ONSET:
                continue
            seq[rank] += 1
            values = metrics_for(step, rank, scenario.fault, rng)
            samples = ([[step, PROBES, probe_answers(step, scenario.fault), None]]
                       if step % 5 == 0 and rank == 0 else [])
            state.handle(_batch(rank, seq[rank], step, now, values, samples), b"r%d" % rank, now)
        state.tick(now)
    end = t0 + STEPS * STEP_SECONDS
    if scenario.fault == "hung_rank":  # the job hangs in a collective; time goes on
        for seconds in range(1, 121):
            state.tick(end + seconds)
    state.finish(end)
    alerts = [{"type": a.type, "severity": a.severity, "step": a.step,
               "seconds_after_onset": a.time - (t0 + ONSET * STEP_SECONDS)} for a in state.alerts]
    stop = state.stop.state
    return Outcome(scenario, alerts, None if stop is None else stop.stop_at_step)


def _msg(kind, rank, **fields):
    return wire.decode(wire.encode(wire.envelope(kind, "bench", rank, 1, **fields)))


def _batch(rank, seq, step, now, values, samples):
    keys = list(values)
    return _msg(Kind.BATCH, rank, seq=seq, t=now, step=step, samples=samples,
                blocks=[[keys, [step], [now], [[values[k] for k in keys]]]])


def run_demo(name: str, train_args: list[str], expected: tuple[str, ...], onset: int) -> Outcome:
    """A real `rlmon demo` run; its alerts.jsonl and stop decision."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "rlmon.cli", "demo", "--out", str(out), "--",
                        *train_args], cwd=REPO, check=True, capture_output=True, timeout=900)
        alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
        report = json.loads((out / "training_report.json").read_text())
    stop = report["summary"].get("stop")
    outcome = Outcome(Scenario(name, "demo", expected), alerts, stop and stop["stop_at_step"],
                      steps=report["summary"]["total_iterations"])
    outcome.onset = onset
    return outcome


SYNTHETIC = [
    *[Scenario(f"healthy (seed {seed})", "none", (), seed) for seed in range(5)],
    Scenario("KL blow-up", "kl_blowup", ("KL_HIGH", "KL_ACCELERATING")),
    Scenario("reward hacking via a length exploit", "length_exploit",
             ("REWARD_HACKING", "LENGTH_BLOWUP")),
    Scenario("reward flatline", "flatline", ("FLATLINE", "DROP")),
    Scenario("forgetting of probe answers", "forgetting", ("FORGETTING",)),
    Scenario("NaN loss on rank 1", "nan_loss", ("NAN_VALUE",)),
    Scenario("straggler rank 1 (3x rollout)", "straggler", ("STRAGGLER",)),
    Scenario("hung rank 1", "hung_rank", ("RANK_SILENT", "RANK_STUCK")),
]


def table(outcomes: list[Outcome]) -> str:
    """The markdown table of the scenarios with faults, then the false-alarm line."""
    lines = ["| scenario | expected | detected | lead (steps) to alert | to stop | other alerts |",
             "|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if not outcome.scenario.expected:
            continue
        onset = getattr(outcome, "onset", ONSET)
        hits = [a for a in outcome.alerts if a["type"] in outcome.scenario.expected
                and a.get("seconds_after_onset", a["step"] - onset) >= 0]
        first = [a["step"] for a in hits]
        lead = (min(first) - onset) if first else None
        if hits and min(first) < onset:  # a rank that stopped logging: its step no longer moves
            lead = f"{min(a['seconds_after_onset'] for a in hits):.0f} s"
        stop = outcome.stop_step - onset if outcome.stop_step is not None else None
        others = sorted({f"{a['type']}/{a['severity'][0]}" for a in outcome.alerts
                         if a["type"] not in outcome.scenario.expected})
        lines.append(f"| {outcome.scenario.name} | {', '.join(outcome.scenario.expected)} | "
                     f"{'yes' if first else '**no**'} | {lead if lead is not None else '—'} | "
                     f"{stop if stop is not None else '—'} | {', '.join(others) or '—'} |")
    healthy = [o for o in outcomes if not o.scenario.expected]
    steps = sum(o.steps for o in healthy)
    counts = {sev: sum(a["severity"] == sev for o in healthy for a in o.alerts)
              for sev in ("INFO", "WARNING", "CRITICAL")}
    stops = sum(o.stop_step is not None for o in healthy)
    per_k = ", ".join(f"{sev} {1000 * n / steps:.1f}" for sev, n in counts.items())
    kinds = sorted({a["type"] for o in healthy for a in o.alerts})
    lines.append("")
    lines.append(f"Healthy runs: {len(healthy)} runs, {steps} steps; alerts per 1,000 steps: "
                 f"{per_k}; stops: {stops}; types: {', '.join(kinds) or 'none'}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also run the real demo trainings")
    args = parser.parse_args()
    outcomes = [run_synthetic(s) for s in SYNTHETIC]
    print("## Synthetic streams (2 ranks, 300 steps, fault from step 150)\n")
    print(table(outcomes))
    if args.demo:
        demos = [run_demo("demo: healthy", ["--inject", "none"], (), 0),
                 run_demo("demo: KL blow-up", ["--inject", "kl_blowup", "--inject_step", "150"],
                          ("KL_HIGH",), 150),
                 run_demo("demo: reward hack", ["--inject", "reward_hack", "--inject_step", "60",
                                                "--num_steps", "120"],
                          ("REWARD_HACKING", "FORGETTING", "SPIKE", "KL_HIGH"), 60)]
        print("\n## Real demo trainings (rlmon demo, 2 ranks)\n")
        print(table(demos))


if __name__ == "__main__":
    main()
