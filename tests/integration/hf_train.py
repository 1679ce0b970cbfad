"""A Hugging Face ``Trainer`` run for the integration tests, watched through ``RlmonCallback``.

A tiny GPT-2 built from a config (one layer, width 32, vocabulary 64: no download) learns to
continue random token sequences on CPU. Run it under ``rlmon launch -- torchrun`` (the Trainer
joins a gloo process group itself). Flags: --max-steps N, --kl-spike-at S (from global step S the
trainer's logs carry ``kl = 1.0`` instead of 0.01, the way TRL's trainers add ``kl`` to their logs,
so rlmon's KL rule stops the run), --step-seconds X (each optimizer step also waits X seconds, as
the rollout of an RL step would: the tiny model alone runs ~50 steps/s, faster than a real job
and than a loaded 2-core machine's collector keeps up with), --out DIR (where ``rank<N>.json``
goes: the global step the rank ended at, rlmon's stop reason, the steps it saved a checkpoint at).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from rlmon.integrations.transformers import RlmonCallback

VOCAB, LENGTH = 64, 16


class RandomTokens(torch.utils.data.Dataset):
    """``size`` fixed random sequences of ``LENGTH`` tokens (labels = inputs: causal LM)."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class KLLoggingTrainer(Trainer):
    """A Trainer whose logs carry a ``kl`` value, as TRL's RL trainers' do."""

    kl_spike_at = -1

    def log(self, logs, *args, **kwargs):
        """Add ``kl`` (1.0 from ``kl_spike_at`` on, else 0.01) to the logs."""
        spiking = 0 <= self.kl_spike_at <= self.state.global_step
        logs["kl"] = 1.0 if spiking else 0.01
        super().log(logs, *args, **kwargs)


class StepPace(TrainerCallback):
    """Makes each optimizer step last at least ``seconds`` (the stand-in for a rollout)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_begin(self, args, state, control, **kwargs):
        """Wait ``seconds``: the step's simulated generation time."""
        time.sleep(self.seconds)


class SaveRecorder(TrainerCallback):
    """Remembers the global steps at which the Trainer saved a checkpoint."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        """Record ``state.global_step``."""
        self.steps.append(state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--kl-spike-at", type=int, default=-1)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=1,
                                       n_head=2))
    training = TrainingArguments(
        output_dir=str(args.out / "hf"), max_steps=args.max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    callback, saves = RlmonCallback(), SaveRecorder()
    KLLoggingTrainer.kl_spike_at = args.kl_spike_at
    trainer = KLLoggingTrainer(model=model, args=training, train_dataset=RandomTokens(4096),
                               callbacks=[StepPace(args.step_seconds), callback, saves])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(
        {"global_step": trainer.state.global_step, "reason": callback.monitor.stop_reason,
         "stop_at_step": callback.monitor.stop_at_step, "saves": saves.steps,
         "stats": callback.monitor.statistics()}))


if __name__ == "__main__":
    main()
