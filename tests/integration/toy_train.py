"""A tiny distributed training loop for integration tests (gloo, CPU), instrumented with rlmon.

Each step does one all_reduce, so ranks stay within a step of each other like a real job, and a
rank that left the loop early would hang the other one (the tests would then time out). Writes
``<out>/rank<N>.json`` with the last step and the stop reason.

Flags: --steps N, --kl-spike-at S (KL jumps to 1.0 from step S), --step-seconds X (work per step,
as a wall-clock pace), --slow-rank R (that rank takes 3x as long per step), --rl-metrics (also log
the metric names an RL dashboard shows: ``rewards/format``, ``rewards/answer``, ``policy_loss``,
``value_loss``, ``clip_fraction``, ``entropy``, ``response_length``), --bad-values-at S (at step S
the last rank also logs a NaN, ``nan_probe``, and a value ``log`` cannot read, ``bad_probe``, which
the rank drops and counts as ``bad_value``).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import rlmon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kl-spike-at", type=int, default=-1)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--rl-metrics", action="store_true")
    parser.add_argument("--bad-values-at", type=int, default=-1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mon = rlmon.init()
    pace = args.step_seconds * (3 if rank == args.slow_rank else 1)
    last, reason, checkpoints = -1, None, []
    for step in range(args.steps):
        until = time.monotonic() + pace
        while time.monotonic() < until:  # the step's "work"
            pass
        grad = torch.tensor([float(step + rank)])
        dist.all_reduce(grad)
        kl = 1.0 if 0 <= args.kl_spike_at <= step else 0.01 + 0.001 * rank
        metrics = {"reward": step / args.steps, "kl": kl, "loss": 1.0 / (step + 1),
                   "grad": grad[0]}
        if args.rl_metrics:
            metrics.update(rl_metrics(step / args.steps, rank))
        mon.log(step, metrics)
        if step == args.bad_values_at and rank == dist.get_world_size() - 1:
            mon.log(step, {"nan_probe": float("nan")})
            mon.log(step, {"bad_probe": torch.ones(2)})  # not a scalar: dropped, counted
        last = step
        if mon.should_checkpoint(step):
            checkpoints.append(step)
        if mon.should_stop(step):
            reason = mon.stop_reason
            break
    closing = time.monotonic()
    mon.close()
    close_seconds = time.monotonic() - closing
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(
        {"last_step": last, "reason": reason, "close_seconds": close_seconds,
         "checkpoints": checkpoints,
         "stats": mon.statistics(), "pid": os.getpid()}))
    dist.destroy_process_group()


def rl_metrics(progress: float, rank: int) -> dict[str, float]:
    """GRPO/PPO-style metrics at ``progress`` (0..1) of the run: smooth, finite, rank-dependent."""
    return {"rewards/format": min(1.0, 2 * progress), "rewards/answer": 0.5 * progress,
            "policy_loss": 0.1 - 0.05 * progress + 0.001 * rank,
            "value_loss": 1.0 / (1 + 10 * progress),
            "clip_fraction": 0.2 * (1 - progress), "entropy": 2.0 - progress,
            "response_length": 64.0 + 32 * progress + rank}


if __name__ == "__main__":
    main()
