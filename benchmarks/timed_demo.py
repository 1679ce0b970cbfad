"""The demo training (:mod:`rlmon.demo.train_grpo`, same flags) with each step's start and end
times recorded, for the training-overhead A/B (:mod:`benchmarks.training_ab`).

The demo prints its elapsed time only to 0.1 s, so this wrapper times the steps itself without
changing the demo: it wraps the trainer that ``train_grpo.make_trainer`` returns so that every
``trainer.step(step)`` call is timed with ``perf_counter``. The time from one step's start to the
next one's is the loop iteration (the step, ``should_stop``, the all-rank means, printing). On exit
each rank writes ``rank<RANK>.json`` (``starts``, ``ends``) to ``$RLMON_BENCH_STEP_TIMES``. Run it
where the demo module would run::

    RLMON_BENCH_STEP_TIMES=DIR torchrun --nproc_per_node 2 benchmarks/timed_demo.py --quick
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmon.demo import train_grpo  # noqa: E402


def install_step_timer(starts: list[float], ends: list[float]) -> None:
    """Make ``train_grpo.make_trainer`` return trainers whose ``step`` records its times."""
    original = train_grpo.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        step = trainer.step

        def timed_step(index: int):
            starts.append(time.perf_counter())
            try:
                return step(index)
            finally:
                ends.append(time.perf_counter())
        trainer.step = timed_step
        return trainer

    train_grpo.make_trainer = make_trainer


def main(argv: list[str] | None = None) -> int:
    """Run the demo with the step timer; write this rank's times; the demo's exit status."""
    starts: list[float] = []
    ends: list[float] = []
    install_step_timer(starts, ends)
    try:
        return train_grpo.main(sys.argv[1:] if argv is None else argv)
    finally:
        out = os.environ.get("RLMON_BENCH_STEP_TIMES")
        if out:
            path = Path(out) / f"rank{os.environ.get('RANK', '0')}.json"
            path.write_text(json.dumps({"starts": starts, "ends": ends}))


if __name__ == "__main__":
    sys.exit(main())
