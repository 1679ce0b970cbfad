"""Shared pieces of the seed-guide examples: a tiny real PPO-style trainer and a clean run dir."""

from __future__ import annotations

import pytest
import torch

from rlmon import TrainingEvent, TrainingPhase

PROMPTS = [f"What is {a} + {a}?" for a in range(4)]


class TinyPPOTrainer:
    """Stands in for the guide's PPOTrainer: a 2-armed policy trained by a clipped-ratio update on
    CPU, emitting the seed's events. ``kl_blowup_at`` scales its KL up from that step on."""

    def __init__(self, monitor=None, kl_blowup_at: int | None = None, **_: object) -> None:
        torch.manual_seed(0)
        self.monitor = monitor
        self.policy = torch.nn.Linear(4, 2)
        self.value = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD([*self.policy.parameters(), *self.value.parameters()], lr=0.1)
        self.kl_blowup_at = kl_blowup_at
        self.steps_run = 0

    def _emit(self, event: TrainingEvent) -> None:
        if self.monitor is not None:
            self.monitor.on_event(event)

    def train(self, prompts, num_steps: int) -> dict:
        """Run up to ``num_steps`` iterations; stop early when the monitor says so."""
        self._emit(TrainingEvent(TrainingPhase.TRAINING_START, 0, metadata={"num_steps": num_steps}))
        for step in range(num_steps):
            self._emit(TrainingEvent(TrainingPhase.ITERATION_START, step))
            metrics = self._update(step, prompts)
            self._emit(TrainingEvent(TrainingPhase.ITERATION_END, step, metrics=metrics))
            self.steps_run = step + 1
            if self.monitor is not None and self.monitor.should_stop_early()[0]:
                break
        self._emit(TrainingEvent(TrainingPhase.TRAINING_END, self.steps_run))
        return {"steps": self.steps_run}

    def _update(self, step: int, prompts) -> dict:
        x = torch.randn(8, 4)
        old = torch.log_softmax(self.policy(x), -1).detach()
        actions = torch.distributions.Categorical(logits=old).sample()
        reward = (actions == 1).float()
        responses = [("yes " if a else "no ") * (1 + step % 3) for a in actions.tolist()[:len(prompts)]]
        self._emit(TrainingEvent(TrainingPhase.RESPONSE_GENERATED, step,
                                 metadata={"prompts": list(prompts), "responses": responses}))
        self._emit(TrainingEvent(TrainingPhase.REWARD_COMPUTED, step,
                                 metrics={"reward": float(reward.mean())}))
        advantage = reward - self.value(x).squeeze(-1).detach()
        logp = torch.log_softmax(self.policy(x), -1)
        ratio = torch.exp(logp.gather(1, actions[:, None]).squeeze(1) - old.gather(1, actions[:, None]).squeeze(1))
        clipped = torch.clamp(ratio, 0.8, 1.2)
        policy_loss = -torch.min(ratio * advantage, clipped * advantage).mean()
        value_loss = (self.value(x).squeeze(-1) - reward).pow(2).mean()
        self.opt.zero_grad()
        (policy_loss + value_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 10.0)
        self.opt.step()
        with torch.no_grad():
            kl = float((old.exp() * (old - torch.log_softmax(self.policy(x), -1))).sum(-1).mean())
        if self.kl_blowup_at is not None and step >= self.kl_blowup_at:
            kl = 1.0 + step
        self._emit(TrainingEvent(TrainingPhase.POLICY_UPDATE, step, metrics={
            "policy_loss": float(policy_loss.detach()), "clip_fraction": float((ratio != clipped).float().mean()),
            "advantage_mean": float(advantage.mean()), "advantage_std": float(advantage.std()),
            "grad_norm": float(grad_norm)}))
        self._emit(TrainingEvent(TrainingPhase.VALUE_UPDATE, step, metrics={"value_loss": float(value_loss)}))
        return {"loss": float(policy_loss + value_loss), "reward": float(reward.mean()), "kl_div": kl}


PPOTrainer = TinyPPOTrainer


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Run each example in its own directory, so ``./outputs`` is fresh and the embedded
    collector is used (no RLMON_ENDPOINT)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLMON_ENDPOINT", raising=False)
    monkeypatch.delenv("RLMON_OUT", raising=False)
    monkeypatch.delenv("RLMON_DISABLE", raising=False)
    return tmp_path
