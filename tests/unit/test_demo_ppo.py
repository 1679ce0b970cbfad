"""The demo's PPO pieces (rlmon.demo.train_ppo) and the --algo / --verbose switches."""

from __future__ import annotations

import os

import pytest

from rlmon.demo.task import MAX_TOTAL_REWARD, TOKENIZER


@pytest.fixture
def ppo():
    """The demo's PPO module, skipped where torch is not installed (failed under CI)."""
    if os.environ.get("CI"):
        import torch  # noqa: F401  (in CI a missing torch must fail, not skip)
    pytest.importorskip("torch")
    from rlmon.demo import train_ppo

    return train_ppo


def test_gae_with_lambda_one_and_no_values_is_the_reward_to_go(ppo):
    """lambda = 1 and zero values: each token's advantage is the sum of the rewards after it."""
    import torch

    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    advantages = ppo.gae(rewards, torch.zeros(2, 4), mask, lam=1.0)
    assert advantages.tolist() == [[6.0, 5.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0]]


def test_gae_with_lambda_zero_is_the_td_error(ppo):
    """lambda = 0: r_t + V_(t+1) - V_t, with no value after a row's last token."""
    import torch

    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.7]])
    advantages = ppo.gae(rewards, values, torch.ones(1, 3), lam=0.0)
    assert advantages[0].tolist() == pytest.approx([0.3, 0.2, 0.3])


def test_token_rewards_put_the_scaled_task_reward_on_the_last_token(ppo):
    """The KL penalty on every generated token, the task reward (scaled) on the last one."""
    import torch

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.full((2, 3), 0.5)
    rewards = ppo.token_rewards(torch.tensor([MAX_TOTAL_REWARD, 0.0]), kl, mask, kl_coef=0.1)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, -0.05, 0.95, -0.05, 0.0, 0.0])


def test_whiten_normalises_only_the_masked_in_positions(ppo):
    """Mean 0 and std 1 over the mask; 0 outside it."""
    import torch

    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo.whiten(values, mask)[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_ppo_loss_before_any_update(ppo):
    """Policy = old policy: no clipping, policy loss -mean(A), value loss half the MSE."""
    import torch

    from rlmon.demo.model import token_log_probs

    torch.manual_seed(0)
    logits = torch.randn(2, 3, TOKENIZER.vocab_size)
    tokens = torch.randint(3, TOKENIZER.vocab_size, (2, 3))
    batch = ppo.Rollout(problems=[], prompt_tokens=torch.zeros(2, 1, dtype=torch.long),
                        completion_tokens=tokens, mask=torch.ones(2, 3), completions=[],
                        temperature=1.0)
    advantages = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
    targets = ppo.Targets(old_log_probs=token_log_probs(logits, tokens), advantages=advantages,
                          returns=torch.ones(2, 3), stats={})
    parts = ppo.ppo_loss(logits, torch.zeros(2, 3), batch, targets, clip_eps=0.2, value_coef=0.5)
    assert float(parts["clip_fraction"]) == 0.0
    assert float(parts["policy_loss"]) == pytest.approx(-float(advantages.mean()), abs=1e-6)
    assert float(parts["value_loss"]) == pytest.approx(0.5)
    assert float(parts["approx_kl"]) == pytest.approx(0.0, abs=1e-6)


def test_critic_starts_at_zero_with_the_policy_body_and_its_own_weights(ppo):
    """make_critic: one value per position, zero at first; a copy, not the policy's tensors."""
    import torch

    from rlmon.demo.model import TinyPolicy

    policy = TinyPolicy(TOKENIZER.vocab_size, d_model=16, num_layers=1)
    critic = ppo.make_critic(policy)
    values = critic(torch.tensor([[TOKENIZER.bos_id, 5, 6]]))
    assert values.shape == (1, 3, 1) and torch.all(values == 0)
    assert torch.equal(critic.embed.weight, policy.embed.weight)
    assert critic.embed.weight is not policy.embed.weight


def test_one_ppo_step_returns_the_ppo_mechanics(ppo):
    """A single-process PPO step logs the names the collector's PPO detectors read, and the
    verbose ones only at the VERBOSE level."""
    import rlmon
    from rlmon.demo import train_grpo
    from rlmon.demo.model import TinyPolicy

    config = train_grpo.DemoConfig(algo="ppo", batch_size=2, group_size=2, d_model=16,
                                   warmup_steps=1, max_new_tokens=6)
    policy = TinyPolicy(TOKENIZER.vocab_size, config.d_model)
    trainer = train_grpo.make_trainer(config, policy, 0, 1, rlmon.NullMonitor())
    assert isinstance(trainer, ppo.PPOTrainer)
    metrics = trainer.step(0)
    for name in ("policy_loss", "value_loss", "clip_fraction", "advantage_mean", "advantage_std",
                 "grad_norm", "kl", "entropy", "reward", *train_grpo.VERBOSE_METRICS):
        assert name in metrics, name
    assert not set(train_grpo.without_verbose(metrics)) & set(train_grpo.VERBOSE_METRICS)


def test_algo_and_verbose_switches_parse(ppo):
    """--algo ppo and --verbose reach the config; --verbose prints every step; bad algo refused."""
    from rlmon.demo import train_grpo

    config = train_grpo.parse_args(["--algo", "ppo", "--verbose"])
    assert (config.algo, config.verbose, config.print_every) == ("ppo", True, 1)
    assert train_grpo.parse_args([]).algo == "grpo"
    assert (train_grpo.DemoConfig().kl_coef, config.kl_coef) == (0.04, 0.1)
    assert train_grpo.parse_args(["--algo", "ppo", "--kl_coef", "0.2"]).kl_coef == 0.2
    with pytest.raises(ValueError):
        train_grpo.DemoConfig(algo="a2c")
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--algo", "a2c"])
