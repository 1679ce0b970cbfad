"""The demo training job: GRPO on a toy addition task, on CPU, watched by rlmon.

Run it as ``python -m rlmon.demo.train_grpo`` (one process) or
``torchrun --nproc_per_node 2 -m rlmon.demo.train_grpo`` (two ranks, gloo,
``DistributedDataParallel``). Each rank draws its own prompts; gradients are averaged by DDP.

What happens:

1. **Warm-up** (a few seconds, identical on every rank): supervised training on well-formed
   completions whose answers are *noisy*: the true sum plus a random offset in -2 .. 2, so right
   only about one time in five. The policy learns the format and roughly where the answer lies,
   not the exact sums (about 20 % of its sampled answers are right). The warmed-up policy is frozen
   as the reference policy.
2. **GRPO**: per step and rank, ``batch_size`` prompts, ``group_size`` completions each sampled at
   ``temperature``; the four rewards of :mod:`rlmon.demo.task` summed; advantages normalised within
   each group; ``updates_per_step`` Adam updates of the clipped policy-gradient loss plus
   ``kl_coef`` times the k3 estimate of KL(policy ‖ reference) on the sampled tokens (each token's
   estimate capped at ``KL_TOKEN_CAP``). The exact answers are learned here: over the default 200
   steps the mean reward climbs from about 4.9 to about 7.4 (8.5 is perfect), mostly through
   ``rewards/check_answer`` and ``rewards/check_numbers``, while ``kl`` stays under 0.07.

The logged ``kl`` is the mean of that capped k3 estimate over the sampled completion tokens of the
policy that sampled them (the first update pass).

Each step logs through ``rlmon`` (``mon.log``, ``mon.span``, every ``samples_every`` steps
``mon.log_samples``) and leaves the loop when ``mon.should_stop(step)`` says so; that check is the
first thing of every step on every rank, before any collective. ``--inject`` breaks the run on
purpose from ``--inject_step`` on, to show the detectors firing:

* ``kl_blowup``: the learning rate is multiplied by ``BLOWUP_LR_FACTOR`` and the KL term's weight
  becomes ``-BLOWUP_KL_PUSH`` (a sign bug), so the policy runs away from the reference: with the
  defaults the logged ``kl`` reaches 0.1 three steps later and 0.2 four steps later, then settles
  near 9 (each token's estimate is capped at 10).
* ``reward_hack``: ``check_numbers`` is swapped for an exploitable version that pays 1.0 per digit
  anywhere, and sampling runs ``HACK_TEMPERATURE_FACTOR`` times hotter so the policy finds it; the
  total reward first dips, then climbs far past the honest maximum of 8.5 while the format rewards
  and ``rewards/check_answer`` fall to zero and completions become strings of digits (``kl``
  rises past 0.2 on the way).

``--algo ppo`` trains the same policy on the same task by PPO instead, with a value network,
GAE advantages and the KL penalty in the reward (:mod:`rlmon.demo.train_ppo`). ``--verbose`` is
the training-monitor guide's VERBOSE level: each step also logs the finer PPO mechanics
(``VERBOSE_METRICS``: policy change, ratio extremes, advantage and reward ranges, the value
network's figures) and rank 0 prints every step with more columns, then the collector's PPO
summary. The core mechanics (``clip_fraction``, ``grad_norm``, ``advantage_mean``/``_std``, the
losses) are logged at every level: the collector's detectors watch them.

Exit status 0 whether the run finishes or is stopped by rlmon.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rlmon
from rlmon.demo import task
from rlmon.demo.model import (TinyPolicy, completion_logits, sample_completions,
                              sequence_cross_entropy, token_entropy, token_log_probs)
from rlmon.demo.task import TOKENIZER, Problem, RewardFunction

INJECTIONS = ("none", "kl_blowup", "reward_hack")
ALGORITHMS = ("grpo", "ppo")
#: ``kl_coef`` by algorithm. PPO's penalty acts only through the sampled tokens' advantages, a
#: weaker pull than GRPO's gradient of the KL term; at 0.04 its KL spiked past 0.2 in healthy runs.
KL_COEF_DEFAULTS = {"grpo": 0.04, "ppo": 0.1}
#: Logged only with ``--verbose`` (the seed's VERBOSE level): the finer PPO mechanics.
VERBOSE_METRICS = ("approx_kl", "ratio_max", "grad_norm_max", "advantage_min", "advantage_max",
                   "reward_min", "reward_max", "value_mean", "return_mean", "explained_variance",
                   "value_grad_norm")
#: Each token's k3 KL estimate is capped here (verl's ``low_var_kl``): k3 is unbiased but
#: heavy-tailed, and one sampled token the reference likes far more than the policy could
#: otherwise lift a healthy step's mean KL past the monitor's thresholds.
KL_TOKEN_CAP = 10.0
#: A collective that waits longer than this fails instead of hanging the job.
COLLECTIVE_TIMEOUT_S = 300
#: ``kl_blowup`` multiplies the learning rate by this much.
BLOWUP_LR_FACTOR = 3.0
#: ``kl_blowup`` replaces ``kl_coef`` with minus this much: the loss rewards moving away.
BLOWUP_KL_PUSH = 1.0
#: Fixed prompts answered every ``samples_every`` steps for rlmon's forgetting detector.
PROBE_PROBLEMS = [task.make_problem(a, b) for a, b in ((1, 2), (3, 4), (5, 5), (9, 0))]
#: Sampling temperature of the probe answers (near greedy).
PROBE_TEMPERATURE = 0.05
#: ``reward_hack`` samples this much hotter, so the policy finds the exploit.
HACK_TEMPERATURE_FACTOR = 2.0


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Settings of one demo run; every rank must hold the same ones."""

    num_steps: int = 200
    """RL steps (the loop may leave earlier when rlmon asks it to stop)."""
    algo: str = "grpo"
    """The RL algorithm: one of ``ALGORITHMS`` (``ppo``: :mod:`rlmon.demo.train_ppo`)."""
    verbose: bool = False
    """The seed's VERBOSE level: also log ``VERBOSE_METRICS`` and print every step in detail."""
    group_size: int = 8
    """Completions sampled per prompt (the G of GRPO); at least 2."""
    batch_size: int = 8
    """Prompts per rank per step."""
    lr: float = 1e-3
    """Adam learning rate of the RL phase (the policy's and, with PPO, the value network's)."""
    kl_coef: float | None = None
    """Weight of the k3 KL(policy ‖ reference) penalty: in the loss (GRPO) or in each token's
    reward (PPO). None: the algorithm's default in ``KL_COEF_DEFAULTS``."""
    seed: int = 0
    """Seeds the model, the warm-up and (with the rank) each rank's prompts and sampling."""
    inject: str = "none"
    """Failure to inject: one of ``INJECTIONS``."""
    inject_step: int = 20
    """First step the injected failure is active."""
    clip_eps: float = 0.2
    """PPO clipping range of the probability ratio."""
    value_coef: float = 0.5
    """PPO only: weight of the value network's loss."""
    gae_lambda: float = 0.95
    """PPO only: the lambda of generalised advantage estimation (gamma is 1)."""
    updates_per_step: int = 2
    """Optimizer updates per rollout; the second and later ones can clip."""
    max_new_tokens: int = 24
    """Longest completion, end-of-sequence token included."""
    temperature: float = 1.0
    """Sampling temperature (log-probabilities are computed at the same temperature)."""
    warmup_steps: int = 150
    """Supervised format warm-up steps before GRPO."""
    warmup_batch: int = 64
    """Sequences per warm-up step."""
    warmup_lr: float = 1e-2
    """Adam learning rate of the warm-up."""
    warmup_answer_noise: int = 2
    """Warm-up answers are the true sum plus a uniform offset in ``-noise .. noise`` (kept >= 0):
    right only about one time in ``2 * noise + 1``."""
    d_model: int = 64
    """Width of the policy's transformer."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    samples_every: int = 5
    """Log a few prompt/response samples every this many steps."""
    samples_logged: int = 4
    """How many samples each rank logs when it does."""
    print_every: int = 10
    """Rank 0 prints the all-rank means every this many steps (and every step for this many steps
    after an injection starts)."""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {ALGORITHMS}, got {self.algo!r}")
        if self.kl_coef is None:
            self.kl_coef = KL_COEF_DEFAULTS[self.algo]
        if self.inject not in INJECTIONS:
            raise ValueError(f"inject must be one of {INJECTIONS}, got {self.inject!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2 (advantages are relative to the group)")
        for name in ("num_steps", "batch_size", "updates_per_step", "max_new_tokens", "d_model",
                     "samples_every", "print_every", "warmup_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr <= 0 or self.temperature <= 0 or self.kl_coef < 0:
            raise ValueError("lr and temperature must be positive and kl_coef non-negative")


@dataclass(frozen=True, slots=True)
class Rollout:
    """One step's samples on one rank: ``batch_size * group_size`` rows, grouped consecutively."""

    problems: list[Problem]
    prompt_tokens: torch.Tensor
    completion_tokens: torch.Tensor
    mask: torch.Tensor
    completions: list[str]
    temperature: float


@dataclass(frozen=True, slots=True)
class Scores:
    """Rewards of a rollout: per function, their sum, and the group-normalised advantages."""

    per_function: dict[str, torch.Tensor]
    total: torch.Tensor
    advantages: torch.Tensor
    frac_zero_std: float


# -- process setup ---------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """Build the run's :class:`DemoConfig` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m rlmon.demo.train_grpo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: 15 steps after a shorter warm-up (10-15 s)")
    for name in ("num_steps", "group_size", "batch_size", "lr", "seed", "inject_step"):
        default = DemoConfig.__dataclass_fields__[name].default
        parser.add_argument(f"--{name}", type=type(default), default=None,
                            help=f"default {default}")
    parser.add_argument("--kl_coef", type=float, default=None,
                        help="default " + ", ".join(f"{value} ({algo})"
                                                    for algo, value in KL_COEF_DEFAULTS.items()))
    parser.add_argument("--inject", choices=INJECTIONS, default=None,
                        help="break the run on purpose from --inject_step on (default none)")
    parser.add_argument("--algo", choices=ALGORITHMS, default=None,
                        help="grpo (default) or ppo (a value network, GAE, KL in the reward)")
    parser.add_argument("--verbose", action="store_true", default=None,
                        help="also log the finer PPO mechanics and print every step in detail")
    args = parser.parse_args(argv)
    chosen = {name: value for name, value in vars(args).items()
              if name != "quick" and value is not None}
    if args.quick:
        chosen = {"num_steps": 15, "warmup_steps": 100, "print_every": 1, **chosen}
    if args.verbose:
        chosen = {"print_every": 1, **chosen}
    try:
        return DemoConfig(**chosen)
    except ValueError as exc:
        parser.error(str(exc))


def init_distributed() -> tuple[int, int]:
    """Join the gloo process group when torchrun started several ranks; ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    dist.init_process_group(backend="gloo",
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return dist.get_rank(), world_size


def mean_over_ranks(values: list[float], world_size: int) -> list[float]:
    """The mean of ``values`` across ranks (a collective: every rank must call it)."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world_size).tolist()


# -- warm-up ---------------------------------------------------------------------------------------

def warmed_up_policy(config: DemoConfig) -> TinyPolicy:
    """A freshly seeded policy after the format warm-up (the same on every rank)."""
    torch.manual_seed(config.seed)
    policy = TinyPolicy(TOKENIZER.vocab_size, config.d_model)
    warm_up(policy, config)
    return policy


def warm_up(policy: TinyPolicy, config: DemoConfig) -> None:
    """Teach ``policy`` the answer format on noisy (mostly wrong) answers."""
    rng = random.Random(config.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.warmup_lr)
    for _ in range(config.warmup_steps):
        tokens, loss_mask = format_batch(rng, config.warmup_batch, config.warmup_answer_noise)
        loss = sequence_cross_entropy(policy, tokens, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def format_batch(rng: random.Random, count: int, noise: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` well-formed sequences with noisy answers, padded, and their completion mask."""
    rows = []
    for problem in task.sample_problems(rng, count):
        wrong = str(max(0, int(problem.answer) + rng.randint(-noise, noise)))
        rows.append([TOKENIZER.bos_id] + TOKENIZER.encode(problem.prompt)
                    + TOKENIZER.encode(task.format_completion(wrong)) + [TOKENIZER.eos_id])
    width = max(map(len, rows))
    tokens = torch.tensor([row + [TOKENIZER.pad_id] * (width - len(row)) for row in rows])
    targets = tokens[:, 1:]
    completion_part = torch.arange(width - 1) >= task.PROMPT_LENGTH
    loss_mask = ((targets != TOKENIZER.pad_id) & completion_part).float()
    return tokens, loss_mask


# -- one GRPO step ---------------------------------------------------------------------------------

def rollout(policy: TinyPolicy, problems: list[Problem], config: DemoConfig, temperature: float,
            generator: torch.Generator) -> Rollout:
    """Sample ``group_size`` completions for each problem from ``policy`` at ``temperature``."""
    prompt_rows = [[TOKENIZER.bos_id] + TOKENIZER.encode(problem.prompt)
                   for problem in problems for _ in range(config.group_size)]
    prompt_tokens = torch.tensor(prompt_rows)
    samples = sample_completions(policy, prompt_tokens, max_new_tokens=config.max_new_tokens,
                                 temperature=temperature, eos_id=TOKENIZER.eos_id,
                                 pad_id=TOKENIZER.pad_id, generator=generator)
    completions = [TOKENIZER.decode(row) for row in samples.tokens.tolist()]
    return Rollout(problems=problems, prompt_tokens=prompt_tokens,
                   completion_tokens=samples.tokens, mask=samples.mask, completions=completions,
                   temperature=temperature)


def score(batch: Rollout, reward_functions: dict[str, RewardFunction], group_size: int) -> Scores:
    """Run every reward function on ``batch`` and normalise the summed reward within each group."""
    prompts = [problem.prompt for problem in batch.problems for _ in range(group_size)]
    answers = [problem.answer for problem in batch.problems for _ in range(group_size)]
    per_function = {name: torch.tensor(function(prompts, batch.completions, answer=answers))
                    for name, function in reward_functions.items()}
    total = torch.stack(list(per_function.values())).sum(0)
    groups = total.view(-1, group_size)
    group_std = groups.std(dim=1, keepdim=True)
    advantages = ((groups - groups.mean(dim=1, keepdim=True)) / (group_std + 1e-4)).view(-1)
    frac_zero_std = float((group_std < 1e-6).float().mean())
    return Scores(per_function=per_function, total=total, advantages=advantages,
                  frac_zero_std=frac_zero_std)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logits: torch.Tensor, batch: Rollout, advantages: torch.Tensor,
              old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, clip_eps: float,
              kl_coef: float) -> dict[str, torch.Tensor]:
    """The clipped policy-gradient loss plus ``kl_coef`` × k3 KL, with its parts (token means)."""
    log_probs = token_log_probs(logits, batch.completion_tokens)
    ratio = torch.exp(log_probs - old_log_probs)
    advantage = advantages.unsqueeze(1)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy_term = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    log_ref_ratio = ref_log_probs - log_probs
    kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0).clamp(max=KL_TOKEN_CAP)
    clipped = (((ratio < 1.0 - clip_eps) & (advantage < 0))
               | ((ratio > 1.0 + clip_eps) & (advantage > 0)))
    policy_loss = masked_mean(policy_term, batch.mask)
    kl_mean = masked_mean(kl, batch.mask)
    return {"loss": policy_loss + kl_coef * kl_mean, "policy_loss": policy_loss, "kl": kl_mean,
            "clip_fraction": masked_mean(clipped.float(), batch.mask),
            **policy_change(log_probs, old_log_probs, batch.mask)}


def policy_change(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """How far the updated policy moved from the one that sampled (detached): ``approx_kl``
    (token mean of log old/new) and ``ratio_max`` (largest new/old probability ratio)."""
    delta = (log_probs - old_log_probs).detach()
    return {"approx_kl": masked_mean(-delta, mask),
            "ratio_max": (delta.exp() * mask).max()}


def update(model: nn.Module, reference: TinyPolicy, optimizer: torch.optim.Optimizer,
           batch: Rollout, scores: Scores, config: DemoConfig, kl_coef: float) -> dict[str, float]:
    """``updates_per_step`` optimizer steps on ``batch``. ``kl``, the losses and ``entropy`` are
    those of the first pass (the policy that sampled); clip fraction and gradient norm are means
    over all passes."""
    ref_log_probs = reference_log_probs(reference, batch)
    old_log_probs, first, clip_fractions, grad_norms, parts = None, {}, [], [], {}
    for index in range(config.updates_per_step):
        logits = completion_logits(model, batch.prompt_tokens, batch.completion_tokens,
                                   batch.temperature)
        if index == 0:
            old_log_probs = token_log_probs(logits.detach(), batch.completion_tokens)
        parts = grpo_loss(logits, batch, scores.advantages, old_log_probs, ref_log_probs,
                          config.clip_eps, kl_coef)
        if index == 0:
            first = {name: float(parts[name].detach()) for name in ("loss", "policy_loss", "kl")}
            first["entropy"] = float(masked_mean(token_entropy(logits.detach()), batch.mask))
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        grad_norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)))
        optimizer.step()
        clip_fractions.append(float(parts["clip_fraction"]))
    return {**first, "clip_fraction": sum(clip_fractions) / len(clip_fractions),
            "grad_norm": sum(grad_norms) / len(grad_norms), "grad_norm_max": max(grad_norms),
            "approx_kl": float(parts["approx_kl"]), "ratio_max": float(parts["ratio_max"])}


@torch.no_grad()
def reference_log_probs(reference: TinyPolicy, batch: Rollout) -> torch.Tensor:
    """Log-probabilities ``[B, L]`` of the sampled tokens under the frozen reference policy (at the
    sampling temperature)."""
    logits = completion_logits(reference, batch.prompt_tokens, batch.completion_tokens,
                               batch.temperature)
    return token_log_probs(logits, batch.completion_tokens)


@dataclass(frozen=True, slots=True)
class StepSettings:
    """What one step runs with; an injected failure changes some of these."""

    learning_rate: float
    kl_coef: float
    temperature: float
    exploitable_reward: bool


# -- the run ---------------------------------------------------------------------------------------

class GRPOTrainer:
    """One rank's GRPO state: policy (DDP-wrapped when several ranks), frozen reference, optimizer,
    this rank's prompt and sampling random streams, and the monitor it logs to."""

    def __init__(self, config: DemoConfig, policy: TinyPolicy, rank: int, world_size: int,
                 monitor: rlmon.Monitor | rlmon.NullMonitor) -> None:
        self.config, self.policy, self.monitor = config, policy, monitor
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        trainable = self.trainable()
        self.model = DistributedDataParallel(trainable) if world_size > 1 else trainable
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.rewards = {exploitable: dict(zip(functions, monitor.wrap_rewards(
                            list(functions.values()), names=list(functions))))
                        for exploitable in (False, True)
                        for functions in [task.reward_functions(exploitable)]}
        self.probe_generator = torch.Generator().manual_seed(config.seed)
        self.prompt_rng = random.Random(config.seed * 1_000_003 + rank)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 7919 * (rank + 1))

    def trainable(self) -> nn.Module:
        """The module the optimizer trains (DDP-wrapped when several ranks): the policy."""
        return self.policy

    def injected(self, step: int) -> bool:
        """Whether the configured failure is active at ``step``."""
        return self.config.inject != "none" and step >= self.config.inject_step

    def just_injected(self, step: int) -> bool:
        """Whether ``step`` is among the first ``print_every`` steps of the injected failure."""
        return self.injected(step) and step < self.config.inject_step + self.config.print_every

    def step(self, step: int) -> dict[str, float]:
        """Sample, score and update once; log the step's metrics and return them."""
        config, monitor = self.config, self.monitor
        settings = self.settings(step)
        for group in self.optimizer.param_groups:
            group["lr"] = settings.learning_rate
        with monitor.span("rollout"):
            problems = task.sample_problems(self.prompt_rng, config.batch_size)
            batch = rollout(self.policy, problems, config, settings.temperature, self.generator)
        with monitor.span("reward"):
            scores = score(batch, self.rewards[settings.exploitable_reward], config.group_size)
        with monitor.span("update"):
            stats = self.learn(batch, scores, settings)
        metrics = step_metrics(batch, scores, stats, settings.learning_rate)
        monitor.log(step, metrics if config.verbose else without_verbose(metrics))
        if step % config.samples_every == 0:
            self.log_probe(step)
            self.log_samples(step, batch, scores)
        return metrics

    def learn(self, batch: Rollout, scores: Scores, settings: StepSettings) -> dict[str, float]:
        """The GRPO update on ``batch`` (see :func:`update`); its statistics."""
        return update(self.model, self.reference, self.optimizer, batch, scores, self.config,
                      settings.kl_coef)

    def log_probe(self, step: int) -> None:
        """Answer the fixed probe prompts almost greedily and log them: rlmon's forgetting
        detector compares these answers with the first ones it saw."""
        with torch.no_grad():
            probe = rollout(self.policy, PROBE_PROBLEMS, self.config, PROBE_TEMPERATURE,
                            self.probe_generator)
        rows = range(0, len(probe.completions), self.config.group_size)
        self.monitor.log_samples(step, [f"probe: {p.prompt}" for p in PROBE_PROBLEMS],
                                 [probe.completions[row] for row in rows])

    def settings(self, step: int) -> StepSettings:
        """What ``step`` runs with: the configured values, or the injected failure's."""
        config = self.config
        if not self.injected(step):
            return StepSettings(learning_rate=config.lr, kl_coef=config.kl_coef,
                                temperature=config.temperature, exploitable_reward=False)
        if config.inject == "kl_blowup":
            return StepSettings(learning_rate=config.lr * BLOWUP_LR_FACTOR, kl_coef=-BLOWUP_KL_PUSH,
                                temperature=config.temperature, exploitable_reward=False)
        return StepSettings(learning_rate=config.lr, kl_coef=config.kl_coef,
                            temperature=config.temperature * HACK_TEMPERATURE_FACTOR,
                            exploitable_reward=True)

    def log_samples(self, step: int, batch: Rollout, scores: Scores) -> None:
        """Log the first completion of the first ``samples_logged`` groups."""
        group_size = self.config.group_size
        rows = range(0, len(batch.completions), group_size)[:self.config.samples_logged]
        prompts = [batch.problems[row // group_size].prompt for row in rows]
        responses = [batch.completions[row] for row in rows]
        self.monitor.log_samples(step, prompts, responses,
                                 rewards=[float(scores.total[row]) for row in rows])


def step_metrics(batch: Rollout, scores: Scores, stats: dict[str, float],
                 learning_rate: float) -> dict[str, float]:
    """The step's scalars (this rank's means); ``stats`` (the update's) win over the group
    advantages' figures computed here."""
    advantages = scores.advantages
    metrics = {"reward": float(scores.total.mean()), "reward_std": float(scores.total.std()),
               "reward_min": float(scores.total.min()), "reward_max": float(scores.total.max()),
               "advantage_mean": float(advantages.mean()), "advantage_std": float(advantages.std()),
               "advantage_min": float(advantages.min()), "advantage_max": float(advantages.max()),
               **stats, "response_length": float(batch.mask.sum(1).mean()),
               "frac_reward_zero_std": scores.frac_zero_std, "learning_rate": learning_rate}
    for name, values in scores.per_function.items():
        metrics[f"rewards/{name}"] = float(values.mean())
    return metrics


def without_verbose(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` less ``VERBOSE_METRICS`` (what the default, SIMPLE level logs)."""
    return {key: value for key, value in metrics.items() if key not in VERBOSE_METRICS}


#: Metrics averaged over ranks every step for the console and the final summary, with their
#: short console names.
SUMMARY_KEYS = {"reward": "reward", "rewards/match_format_exactly": "format_exact",
                "rewards/match_format_approximately": "format_approx",
                "rewards/check_answer": "answer", "rewards/check_numbers": "numbers", "kl": "kl"}
#: With ``--verbose``, these too (those the algorithm logs), with their short console names.
VERBOSE_SUMMARY_KEYS = {"entropy": "entropy", "clip_fraction": "clip", "approx_kl": "approx_kl",
                        "grad_norm": "grad", "advantage_std": "adv_std", "value_loss": "value_loss",
                        "explained_variance": "expl_var"}


def console_keys(config: DemoConfig, metrics: dict[str, float]) -> dict[str, str]:
    """The metrics the console shows (full name -> short name): ``SUMMARY_KEYS``, plus with
    ``verbose`` the ``VERBOSE_SUMMARY_KEYS`` present in ``metrics``."""
    if not config.verbose:
        return SUMMARY_KEYS
    return {**SUMMARY_KEYS, **{key: short for key, short in VERBOSE_SUMMARY_KEYS.items()
                               if key in metrics}}


def say(line: str) -> None:
    """Print ``line`` in one write, so lines of ranks sharing a terminal do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_progress(step: int, means: dict[str, float], names: dict[str, str],
                   elapsed: float) -> None:
    """One console line of the all-rank ``means``, each under its short name in ``names``."""
    parts = "  ".join(f"{names[key]} {value:+.3f}" for key, value in means.items())
    say(f"step {step:4d}  {parts}  ({elapsed:5.1f} s)")


def print_summary(history: list[dict[str, float]]) -> None:
    """Mean of every console metric over the first and the last 10 steps."""
    window = min(10, len(history))
    if window == 0:
        return
    for key in history[-1]:
        first = sum(row[key] for row in history[:window]) / window
        last = sum(row[key] for row in history[-window:]) / window
        say(f"{key:36s} first {window} steps {first:+.3f}   last {window} steps {last:+.3f}")


def run(config: DemoConfig) -> None:
    """Warm up, train until ``num_steps`` or rlmon's stop, print how it ended."""
    torch.set_num_threads(1)
    rank, world_size = init_distributed()
    monitor = rlmon.init()
    started = time.perf_counter()
    trainer = make_trainer(config, warmed_up_policy(config), rank, world_size, monitor)
    if rank == 0:
        injection = f" from step {config.inject_step}" if config.inject != "none" else ""
        say(f"warm-up done in {time.perf_counter() - started:.1f} s; {config.algo.upper()} on "
            f"{world_size} rank(s), inject={config.inject}{injection}")
    history, stopped_at = train(trainer, rank, world_size, started)
    report(rank, monitor, history, stopped_at)
    if rank == 0 and config.verbose:
        print_ppo_summary(monitor)
    monitor.close()
    del trainer  # the DDP reducer goes before the process group it uses
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def make_trainer(config: DemoConfig, policy: TinyPolicy, rank: int, world_size: int,
                 monitor: rlmon.Monitor | rlmon.NullMonitor) -> GRPOTrainer:
    """The trainer of ``config.algo``: :class:`GRPOTrainer`, or PPO's subclass of it."""
    if config.algo == "ppo":
        from rlmon.demo.train_ppo import PPOTrainer

        return PPOTrainer(config, policy, rank, world_size, monitor)
    return GRPOTrainer(config, policy, rank, world_size, monitor)


def train(trainer: GRPOTrainer, rank: int, world_size: int, started: float
          ) -> tuple[list[dict[str, float]], int | None]:
    """The step loop: the all-rank means of the console metrics (:func:`console_keys`) per step
    done, and the step at which rlmon stopped the run (None when it ran all ``num_steps``)."""
    config, history = trainer.config, []
    for step in range(config.num_steps):
        if trainer.monitor.should_stop(step):
            return history, step
        metrics = trainer.step(step)
        names = console_keys(config, metrics)
        means = dict(zip(names, mean_over_ranks([metrics[key] for key in names], world_size)))
        history.append(means)
        if rank == 0 and (step % config.print_every == 0 or trainer.just_injected(step)):
            print_progress(step, means, names, time.perf_counter() - started)
    return history, None


def report(rank: int, monitor: rlmon.Monitor | rlmon.NullMonitor,
           history: list[dict[str, float]], stopped_at: int | None) -> None:
    """Print this rank's ending line and, on rank 0, the first-versus-last summary."""
    if stopped_at is None:
        say(f"rank {rank}: finished {len(history)} steps")
    else:
        reason = monitor.stop_reason or "rlmon asked to stop"
        say(f"rank {rank}: stopped at step {stopped_at} ({reason})")
    if rank == 0:
        print_summary(history)


def print_ppo_summary(monitor: rlmon.Monitor | rlmon.NullMonitor) -> None:
    """Print the collector's PPO-mechanics summary (the seed's ``PPOMetricsTracker`` figures,
    the ``ppo`` query); nothing when there is no collector to ask."""
    summary = monitor.query("ppo")
    if not summary or "error" in summary:
        return
    trends = {name: summary.get(f"{name}_trend") for name in ("policy_loss", "value_loss")}
    say(f"collector's PPO summary: avg clip fraction {summary['avg_clip_fraction']:.4f}, "
        f"{summary['num_policy_updates']} policy updates, trends per step: "
        + ", ".join(f"{name} {_signed(trend)}" for name, trend in trends.items()))


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.5f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rlmon.demo.train_grpo``; returns the exit status (0)."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
