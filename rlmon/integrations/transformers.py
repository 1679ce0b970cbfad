"""rlmon for Hugging Face ``Trainer`` and TRL's trainers (``GRPOTrainer``, ``PPOTrainer``, ...).

::

    from rlmon.integrations.transformers import RlmonCallback   # or rlmon.RlmonCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RlmonCallback()])
    trainer.train()

and run the job under ``rlmon launch --out DIR -- torchrun --nproc_per_node N train.py``.

What reaches the collector, from every rank:

* everything the trainer logs (``on_log``: its ``logs`` dict, numbers only, at
  ``state.global_step``). ``Trainer.log`` runs on every process, not only the main one (the loss is
  averaged across processes first, a collective every rank joins), so each rank sends the same
  ``loss``, ``grad_norm``, ``learning_rate`` and whatever a TRL trainer adds (``kl``, ``reward``,
  ``rewards/<name>/mean``, ``entropy``, ``completions/mean_length``, ...); the collector's
  detectors know those names.
* ``span/step``: this rank's own seconds from ``on_step_begin`` to ``on_step_end`` of each
  optimizer step, sent every step whatever ``logging_steps`` is. It is what keeps the rank table
  (``rlmon_rank_last_step``, liveness) current between logging steps. Collectives in the step even
  it out across ranks; time your own phases with ``monitor.span(...)`` to find a straggler.

What comes back: at the end of every optimizer step (``on_step_end``) the callback asks
``monitor.should_stop(state.global_step)`` and sets ``control.should_training_stop`` when the
coordinated stop is reached (every rank at the same global step, see the README's *Stopping*), and
``control.should_save`` when ``monitor.should_checkpoint(...)`` says a rule with
``action = "checkpoint"`` fired.

Like the rest of rlmon's rank side, no call here blocks on the collector or raises into training.
"""

from __future__ import annotations

import numbers
import time
from typing import Any, Mapping

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import rlmon
from rlmon.monitor import Monitor, NullMonitor

__all__ = ["RlmonCallback", "numeric_logs"]


class RlmonCallback(TrainerCallback):
    """Sends a Trainer's logs to rlmon from every rank and follows rlmon's coordinated stop.

    ``monitor``: the :class:`~rlmon.monitor.Monitor` to use; None (the default) calls
    :func:`rlmon.init` when training begins (``RLMON_ENDPOINT`` and the torchrun variables come from
    the environment) and closes that monitor when training ends. A monitor passed in is left open
    for its owner to close. Thread affinity: the Trainer's thread, as every callback."""

    def __init__(self, monitor: Monitor | NullMonitor | None = None) -> None:
        self._monitor = monitor
        self._owns_monitor = monitor is None
        self._step_started: float | None = None

    @property
    def monitor(self) -> Monitor | NullMonitor:
        """The monitor in use; started with :func:`rlmon.init` on first use when none was given."""
        if self._monitor is None:
            self._monitor = rlmon.init()
        return self._monitor

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """Start the monitor before the first step (again, after an earlier ``train()`` closed
        the one this callback owns: :func:`rlmon.init` returns a fresh one then)."""
        if self._owns_monitor:
            self._monitor = rlmon.init()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        """Remember when this optimizer step began (for ``span/step``)."""
        self._step_started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """Send this rank's ``span/step``; stop or checkpoint where the collector decided."""
        monitor, step = self.monitor, state.global_step
        if self._step_started is not None:
            monitor.log(step, {"span/step": time.perf_counter() - self._step_started})
            self._step_started = None
        if monitor.should_checkpoint(step):
            control.should_save = True
        if monitor.should_stop(step):
            control.should_training_stop = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Send the numbers of ``logs`` at ``state.global_step``; other values are skipped."""
        values = numeric_logs(logs or {})
        if values:
            self.monitor.log(state.global_step, values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Close the monitor this callback started (a monitor passed in stays open)."""
        if self._owns_monitor and self._monitor is not None:
            self._monitor.close()  # kept: stop_reason and statistics() still answer


def numeric_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a Trainer's ``logs`` that rlmon can record: real numbers (booleans
    excluded) and 0-d tensors or arrays, under string keys. Never raises."""
    return {key: value for key, value in logs.items()
            if isinstance(key, str) and _is_scalar(value)}


def _is_scalar(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    return getattr(value, "ndim", None) == 0 and hasattr(value, "item")
