"""The demo's PPO: the same task, policy, warm-up, injections and monitoring as the GRPO demo
(:mod:`rlmon.demo.train_grpo`), trained the way the training-monitor guide's PPO trainer is.

Run it as ``rlmon demo --algo ppo`` or
``torchrun --nproc_per_node 2 -m rlmon.demo.train_ppo [--quick] [--verbose] [--inject ...]``
(the same flags as :mod:`rlmon.demo.train_grpo`, with ``--algo ppo`` implied).

Per step and rank, after the same rollout and rewards as GRPO:

* a **value network** (the critic) estimates, at every completion token, the reward still to come.
  It is a second :class:`~rlmon.demo.model.TinyPolicy` whose head outputs one number instead of
  the vocabulary's logits (the value head), its body initialised from the warmed-up policy's, as
  RLHF's value models are; policy and critic are trained together (one module for DDP, one Adam),
  each with its own gradient clipping;
* **rewards per token**: ``-kl_coef`` times the (capped) k3 estimate of KL(policy ‖ reference)
  at every token, plus the task's summed reward (scaled by ``REWARD_SCALE``, so a perfect answer
  earns 1) at the last one: the KL penalty is in the reward, not in the loss as in GRPO;
* **advantages** by generalised advantage estimation (gamma 1, ``gae_lambda``) against the
  critic's values, whitened over the batch's tokens for the loss; the critic's targets are the
  returns (advantages + values);
* ``updates_per_step`` passes of the clipped policy loss plus ``value_coef`` times the value loss
  (half the mean squared error against the returns).

Logged, besides GRPO's names: ``value_loss``, and ``advantage_mean``/``advantage_std`` of the raw
(unwhitened) token advantages; with ``--verbose`` also ``value_mean``, ``return_mean``,
``explained_variance`` and ``value_grad_norm`` (see ``VERBOSE_METRICS``). These are the names the
collector's PPO detectors and its ``ppo`` query (the seed's ``PPOMetricsTracker``) read.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rlmon.demo import train_grpo
from rlmon.demo.model import TinyPolicy, token_entropy, token_log_probs
from rlmon.demo.task import MAX_TOTAL_REWARD
from rlmon.demo.train_grpo import (KL_TOKEN_CAP, GRPOTrainer, Rollout, Scores, StepSettings,
                                   masked_mean, policy_change, reference_log_probs)


#: The task's reward enters PPO's per-token rewards times this (a perfect answer earns 1): the
#: critic then fits returns of order 1, and ``kl_coef`` weighs the KL penalty against a reward of
#: that size (unscaled, a penalty 8.5 times weaker than GRPO's let the policy drift).
REWARD_SCALE = 1.0 / MAX_TOTAL_REWARD


class ActorCritic(nn.Module):
    """The policy and its critic as one module (so DDP averages both):
    ``forward(tokens[B, T]) -> (logits[B, T, V], values[B, T])``."""

    def __init__(self, policy: TinyPolicy, critic: TinyPolicy) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits and the value of the state at every position of ``tokens``."""
        return self.policy(tokens), self.critic(tokens).squeeze(-1)


def make_critic(policy: TinyPolicy) -> TinyPolicy:
    """A value network: a copy of ``policy`` whose head outputs one value (zero at first)."""
    critic = copy.deepcopy(policy)
    critic.head = nn.Linear(policy.head.in_features, 1)
    nn.init.zeros_(critic.head.weight)
    nn.init.zeros_(critic.head.bias)
    return critic


def completion_outputs(model: nn.Module, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, L, V]`` (at the sampling temperature) that predict each completion token, and
    the values ``[B, L]`` of the states they are predicted from."""
    tokens = torch.cat([batch.prompt_tokens, batch.completion_tokens], dim=1)
    logits, values = model(tokens[:, :-1])
    start = batch.prompt_tokens.shape[1] - 1
    return logits[:, start:] / batch.temperature, values[:, start:]


def token_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(policy ‖ reference) at each token, capped at ``KL_TOKEN_CAP`` (the
    GRPO demo's ``kl``, so the two algorithms log comparable values)."""
    log_ratio = ref_log_probs - log_probs
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=KL_TOKEN_CAP)


def token_rewards(total: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Rewards ``[B, L]``: ``-kl_coef * kl`` on every generated token, plus ``total[b] *
    REWARD_SCALE`` on row ``b``'s last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.index_put((torch.arange(len(total)), last), total * REWARD_SCALE,
                             accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates ``[B, L]`` with gamma 1: the episode of each row ends after
    its last masked-in token (no value follows it); 0 outside the mask."""
    continues = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * continues
    deltas = rewards + next_values - values
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (deltas[:, t] + lam * continues[:, t] * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0, std 1 over the masked-in positions."""
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean) ** 2, mask).sqrt()
    return (values - mean) / (std + 1e-8) * mask


@dataclass(frozen=True, slots=True)
class Targets:
    """What one rollout's updates aim at (all detached, ``[B, L]``)."""

    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    """Whitened, for the policy loss."""
    returns: torch.Tensor
    """The critic's targets: raw advantages plus the old values."""
    stats: dict[str, float]
    """The rollout's figures: ``kl``, ``entropy``, raw advantage and value statistics."""


def make_targets(logits: torch.Tensor, values: torch.Tensor, batch: Rollout,
                 ref_log_probs: torch.Tensor, scores: Scores, kl_coef: float,
                 lam: float) -> Targets:
    """The targets of the updates, from the first pass's (detached) ``logits`` and ``values``."""
    mask = batch.mask
    old_log_probs = token_log_probs(logits, batch.completion_tokens)
    kl = token_kl(old_log_probs, ref_log_probs)
    raw = gae(token_rewards(scores.total, kl, mask, kl_coef), values * mask, mask, lam)
    returns = (raw + values) * mask
    stats = {"kl": float(masked_mean(kl, mask)),
             "entropy": float(masked_mean(token_entropy(logits), mask)),
             **advantage_stats(raw, mask), **value_stats(values, returns, mask)}
    return Targets(old_log_probs=old_log_probs, advantages=whiten(raw, mask), returns=returns,
                   stats=stats)


def advantage_stats(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean, std, min and max of the raw token advantages (masked-in tokens only)."""
    kept = advantages[mask > 0]
    return {"advantage_mean": float(kept.mean()), "advantage_std": float(kept.std()),
            "advantage_min": float(kept.min()), "advantage_max": float(kept.max())}


def value_stats(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, float]:
    """Mean value, mean return, and the critic's explained variance (1 - Var(R - V) / Var(R))."""
    kept_values, kept_returns = values[mask > 0], returns[mask > 0]
    variance = kept_returns.var()
    explained = 1.0 - (kept_returns - kept_values).var() / variance if variance > 0 else 0.0
    return {"value_mean": float(kept_values.mean()), "return_mean": float(kept_returns.mean()),
            "explained_variance": float(explained)}


def ppo_loss(logits: torch.Tensor, values: torch.Tensor, batch: Rollout, targets: Targets,
             clip_eps: float, value_coef: float) -> dict[str, torch.Tensor]:
    """The clipped policy loss plus ``value_coef`` times the value loss, with their parts."""
    log_probs = token_log_probs(logits, batch.completion_tokens)
    ratio = torch.exp(log_probs - targets.old_log_probs)
    advantage = targets.advantages
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = masked_mean(-torch.minimum(ratio * advantage, clipped_ratio * advantage),
                              batch.mask)
    value_loss = 0.5 * masked_mean((values - targets.returns) ** 2, batch.mask)
    clipped = (((ratio < 1.0 - clip_eps) & (advantage < 0))
               | ((ratio > 1.0 + clip_eps) & (advantage > 0)))
    return {"loss": policy_loss + value_coef * value_loss, "policy_loss": policy_loss,
            "value_loss": value_loss, "clip_fraction": masked_mean(clipped.float(), batch.mask),
            **policy_change(log_probs, targets.old_log_probs, batch.mask)}


class PPOTrainer(GRPOTrainer):
    """One rank's PPO state: what :class:`~rlmon.demo.train_grpo.GRPOTrainer` holds, with the
    optimizer and DDP over :class:`ActorCritic` (the policy and its critic). Rollouts, rewards,
    injections, probes and samples are GRPO's."""

    def trainable(self) -> nn.Module:
        """Policy and critic together (the critic's body starts as the warmed-up policy's)."""
        self.actor_critic = ActorCritic(self.policy, make_critic(self.policy))
        return self.actor_critic

    def learn(self, batch: Rollout, scores: Scores, settings: StepSettings) -> dict[str, float]:
        """``updates_per_step`` PPO passes on ``batch``. Losses, ``kl`` and ``entropy`` are the
        first pass's; clip fraction and gradient norms are means over the passes."""
        config = self.config
        ref_log_probs = reference_log_probs(self.reference, batch)
        targets, first, passes = None, {}, []
        for index in range(config.updates_per_step):
            logits, values = completion_outputs(self.model, batch)
            if targets is None:
                targets = make_targets(logits.detach(), values.detach(), batch, ref_log_probs,
                                       scores, settings.kl_coef, config.gae_lambda)
            parts = ppo_loss(logits, values, batch, targets, config.clip_eps, config.value_coef)
            if index == 0:
                first = {name: float(parts[name].detach())
                         for name in ("loss", "policy_loss", "value_loss")}
            passes.append({**self.optimize(parts["loss"]),
                           "clip_fraction": float(parts["clip_fraction"])})
        return {**targets.stats, **first, **mean_of(passes),
                "grad_norm_max": max(row["grad_norm"] for row in passes),
                "approx_kl": float(parts["approx_kl"]), "ratio_max": float(parts["ratio_max"])}

    def optimize(self, loss: torch.Tensor) -> dict[str, float]:
        """One optimizer step on ``loss``; policy and critic gradients are clipped separately
        (so the critic's large early errors do not shrink the policy's step). Their norms."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = self.config.max_grad_norm
        norms = {"grad_norm": nn.utils.clip_grad_norm_(self.policy.parameters(), limit),
                 "value_grad_norm": nn.utils.clip_grad_norm_(
                     self.actor_critic.critic.parameters(), limit)}
        self.optimizer.step()
        return {name: float(norm) for name, norm in norms.items()}


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each key over ``rows`` (all with the same keys)."""
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rlmon.demo.train_ppo``: the demo with ``--algo ppo``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return train_grpo.main(["--algo", "ppo", *args])


if __name__ == "__main__":
    raise SystemExit(main())
