"""RlmonCallback's decisions, against a recording monitor (no Trainer, no processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def hf():
    """rlmon.integrations.transformers; fails under CI and skips elsewhere without transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("transformers is missing (pip install -e '.[hf]')")
        pytest.skip("transformers not installed (pip install -e '.[hf]')")
    from rlmon.integrations import transformers as integration

    return integration


class RecordingMonitor:
    """Records ``log`` calls; stops and checkpoints at the steps it is given."""

    def __init__(self, stop_at: int | None = None, checkpoint_at: int | None = None) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.stop_at, self.checkpoint_at, self.closed = stop_at, checkpoint_at, False

    def log(self, step, metrics):
        self.logged.append((step, dict(metrics)))

    def should_stop(self, step):
        return self.stop_at is not None and step >= self.stop_at

    def should_checkpoint(self, step):
        return step == self.checkpoint_at

    def close(self):
        self.closed = True


def _state(step: int):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = step
    return state


def _step(callback, step: int):
    """One optimizer step as the Trainer drives it; the control after on_step_end."""
    from transformers import TrainerControl, TrainingArguments

    control = TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    callback.on_step_begin(args, _state(step - 1), control)
    return callback.on_step_end(args, _state(step), control)


def test_on_log_sends_the_numbers_at_the_global_step(hf):
    """Numbers and 0-d tensors go out at state.global_step; strings, bools and lists do not."""
    import torch

    monitor = RecordingMonitor()
    callback = hf.RlmonCallback(monitor)
    logs = {"loss": 1.5, "grad_norm": torch.tensor(0.3), "epoch": 1, "note": "x",
            "flag": True, "hist": [1, 2]}
    callback.on_log(None, _state(7), None, logs=logs)
    assert [(step, sorted(metrics)) for step, metrics in monitor.logged] == [
        (7, ["epoch", "grad_norm", "loss"])]


def test_step_end_sends_the_step_time_and_follows_stop_and_checkpoint(hf):
    """Every step sends span/step; should_save at the checkpoint step, should_training_stop at
    the stop step."""
    monitor = RecordingMonitor(stop_at=3, checkpoint_at=2)
    callback = hf.RlmonCallback(monitor)
    controls = [_step(callback, step) for step in (1, 2, 3)]
    assert [(c.should_save, c.should_training_stop) for c in controls] == [
        (False, False), (True, False), (False, True)]
    assert [step for step, metrics in monitor.logged if "span/step" in metrics] == [1, 2, 3]


def test_a_monitor_passed_in_stays_open(hf):
    """on_train_end leaves a caller's monitor open."""
    monitor = RecordingMonitor()
    hf.RlmonCallback(monitor).on_train_end(None, _state(1), None)
    assert not monitor.closed


def test_without_a_monitor_it_starts_and_closes_its_own(hf, monkeypatch):
    """No monitor given: rlmon.init() at train begin (disabled here), closed at train end."""
    import rlmon

    monkeypatch.setenv("RLMON_DISABLE", "1")
    callback = hf.RlmonCallback()
    callback.on_train_begin(None, _state(0), None)
    assert isinstance(callback.monitor, rlmon.NullMonitor)
    callback.on_train_end(None, _state(0), None)


def test_rlmon_exports_the_callback_lazily(hf):
    """rlmon.RlmonCallback is the integration's class; import rlmon alone does not load it."""
    import rlmon

    assert rlmon.RlmonCallback is hf.RlmonCallback
    probe = "import sys, rlmon; print(sorted({'transformers', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
