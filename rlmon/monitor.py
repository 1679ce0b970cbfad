"""The rank API: what a training process calls every step.

:class:`Monitor` is returned by :func:`rlmon.init`. Its hot path (``log``) appends to an in-memory
queue and returns; a background thread (:mod:`rlmon.publisher`) does the encoding and the I/O.
Nothing here blocks on the network or raises into training; problems become counted drops.
:class:`NullMonitor` has the same methods and does nothing (``RLMON_DISABLE=1``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util
import os
import sys
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

from rlmon import wire
from rlmon.config import RankConfig
from rlmon.publisher import DeferredScalar, HostValues, Publisher, StopOffer
from rlmon.rewards import RewardTally, reward_floats
from rlmon.wire import Kind

log = logging.getLogger("rlmon")

_PLAIN_TYPES = frozenset({float, int})
#: Reward-function calls whose values may wait for the next ``log`` call; more are dropped and
#: counted (``bad_sample``), so a loop that never logs cannot grow memory without bound.
MAX_UNSTAMPED_REWARDS = 10_000


class Monitor:
    """Publishes one training process's metrics to the collector and follows its stop state.

    Thread affinity: call from the training thread. Every method returns quickly and never raises
    because of the collector (absent, slow, dead); see each method for its cost."""

    def __init__(self, config: RankConfig, endpoint: str, on_close: Callable[[], None] | None = None,
                 before_close: Callable[[], object] | None = None):
        self.config = config
        self.rank = config.rank
        self.local_rank = config.local_rank
        self.world_size = config.world_size
        self.run_id = config.run_id
        self.endpoint = endpoint
        self._on_close = on_close
        self._before_close = before_close
        self._publisher = Publisher(config, endpoint)
        self._pending = self._publisher.pending
        self._max_pending = config.max_pending
        self._closed = False
        self._attached: dict[str, float] = {}
        """Values sent with the next ``log`` call: span timings, wrapped reward functions'."""
        self.attach_generation = 0
        self._unstamped_rewards: list[list[Any]] = []
        """``[name, values]`` waiting for the step of the next ``log`` call."""
        self._reward_means: dict[str, RewardTally] = {}
        self._seen_offer: StopOffer | None = None
        self._stop_at: int | None = None
        self._stop_reason: str | None = None
        self._last_checked_step: int | None = None
        self._seen_checkpoint: StopOffer | None = None
        self._checkpoint_at: int | None = None
        self._checkpoint_checked_step: int | None = None
        _register_fork_handler(self)

    # -- logging ---------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (floats, ints, 0-d tensors or numpy scalars) for ``step``.

        Cost: an append to a queue (well under a microsecond for plain numbers). A 0-d CUDA tensor
        is copied to the host without blocking and read later by the background thread. When the
        queue holds ``max_pending`` steps the call is dropped and counted (``queue_full``)."""
        pending = self._pending
        self._publisher.ledger.emitted += 1
        if len(pending) >= self._max_pending:
            self._publisher.ledger.drop("closed" if self._closed else "queue_full")
            return
        if self._attached:
            metrics = self._with_attached(metrics, step)
        try:
            if _PLAIN_TYPES.issuperset(map(type, metrics.values())):
                pending.append((step, time.time(), metrics.copy()))
            else:
                pending.append((step, time.time(), _host_values(metrics)))
            self._publisher.current_step = step
        except Exception:  # a bad argument must not take training down
            self._publisher.ledger.drop("bad_value")

    def log_samples(self, step: int, prompts: Sequence[str], responses: Sequence[str],
                    rewards: Sequence[float] | None = None) -> None:
        """Record prompt/response pairs (and optional rewards) for the text-quality detectors."""
        try:
            reward_list = None if rewards is None else [float(r) for r in _to_list(rewards)]
            self._publisher.samples.append([int(step), [str(p) for p in prompts],
                                            [str(r) for r in responses], reward_list])
        except Exception:
            self._publisher.ledger.drop("bad_sample")

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time a phase. The seconds it took are sent as ``span/<name>`` with the next ``log``
        call's step (a phase repeated within one step adds up), so spans inside a step land on
        that step; spans after the last ``log`` are sent at ``close``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"span/{name}"
            spans = self._attached
            spans[key] = spans.get(key, 0.0) + (time.perf_counter() - started)

    def _with_attached(self, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
        """``metrics`` plus the pending span timings (which are then cleared); reward values
        waiting for a step get ``step``."""
        try:
            merged = {**metrics, **self._attached}
        except TypeError:  # not a mapping: let log() count it
            return metrics
        self._attached = {}
        self.attach_generation += 1
        if self._unstamped_rewards:
            self._stamp_reward_values(step)
        return merged

    def _stamp_reward_values(self, step: int) -> None:
        entries, self._unstamped_rewards = self._unstamped_rewards, []
        try:
            step = int(step)
        except (TypeError, ValueError):
            self._publisher.ledger.drop("bad_sample")
            return
        queue = self._publisher.reward_values
        for name, values in entries:
            queue.append([step, name, values])

    def log_reward_values(self, step: int | None, name: str, values: Any) -> None:
        """Send the individual values one reward function returned (one per sample) for the
        collector's per-sample statistics (question ``rewards``; ``docs/protocol.md``, ``rv``).

        ``step`` None (what wrapped reward functions use): the values get the step of the next
        ``log`` call, which also carries their mean over that step as ``rewards/<name>`` (the
        series the reward detectors watch). With a step, only the values are sent. Values are
        numbers, a list, an array or a tensor; non-numbers go as nil and are counted by the
        collector. Cost: one float conversion per value and an append; never raises (a bad
        argument is dropped and counted as ``bad_sample``)."""
        try:
            label = str(name)[:wire.MAX_NAME_LENGTH]
            floats = reward_floats(values)[:wire.MAX_REWARD_VALUES]
            if step is None and len(self._unstamped_rewards) >= MAX_UNSTAMPED_REWARDS:
                self._publisher.ledger.drop("bad_sample")
            elif step is None:
                self._unstamped_rewards.append([label, floats])
                self._attach_reward_mean(label, floats)
            else:
                self._publisher.reward_values.append([int(step), label, floats])
        except Exception:
            self._publisher.ledger.drop("bad_sample")

    def _attach_reward_mean(self, name: str, floats: list) -> None:
        tally = self._reward_means.get(name)
        if tally is None:
            tally = self._reward_means[name] = RewardTally()
        tally.start_step_if_new(self.attach_generation)
        tally.add(floats)
        if tally.count:
            self._attached[f"rewards/{name}"] = tally.total / tally.count

    def wrap_rewards(self, functions: Sequence[Callable], names: Sequence[str] | None = None
                     ) -> list[Callable]:
        """Reward functions with the same names, signatures and return values (TRL's
        ``reward_funcs`` shape) that also send, with the next ``log`` call, each function's mean
        reward (``rewards/<name>``), seconds spent (``reward_fn/<name>/seconds``), and cumulative
        calls and errors (``reward_fn/<name>/calls``, ``.../errors``), and every value returned
        (:meth:`log_reward_values`). Exceptions propagate."""
        from rlmon.rewards import wrap_reward

        names = list(names) if names is not None else [None] * len(functions)
        return [wrap_reward(self, function, name) for function, name in zip(functions, names)]

    def attach(self, values: Mapping[str, float]) -> None:
        """Send ``values`` with the next ``log`` call (replacing earlier attached values of the
        same keys). Cheap; never raises."""
        self._attached.update(values)

    # -- stopping ----------------------------------------------------------------------------------

    def should_stop(self, step: int) -> bool:
        """True exactly when ``step >= stop_at_step`` of the stop state this rank accepted.

        Answers from local state (the background thread keeps it current). A stop state whose
        ``stop_at_step`` this rank has already passed is refused and reported, and the collector
        issues a later one. With ``stop_sync_every=K`` the ranks also agree through a
        ``torch.distributed`` MAX all-reduce every K steps (exact, one collective per K steps)."""
        offer = self._publisher.stop_offer
        if offer is not self._seen_offer:
            self._consider(offer, step)
        self._last_checked_step = step
        if self.config.stop_sync_every and step % self.config.stop_sync_every == 0:
            return self._agree_on_stop(step)
        return self._stop_at is not None and step >= self._stop_at

    def should_checkpoint(self, step: int) -> bool:
        """True once, at the step the collector chose for a checkpoint (a rule with
        ``action = "checkpoint"`` fired), on every rank alike. Answers from local state. A
        checkpoint step this rank has already passed is skipped."""
        offer = self._publisher.checkpoint_offer
        if offer is not self._seen_checkpoint:
            self._seen_checkpoint = offer
            passed = (self._checkpoint_checked_step is not None
                      and offer.stop_at_step <= self._checkpoint_checked_step)
            self._checkpoint_at = None if passed else offer.stop_at_step
        self._checkpoint_checked_step = step
        if self._checkpoint_at is not None and step >= self._checkpoint_at:
            self._checkpoint_at = None
            return True
        return False

    def request_early_stop(self, reason: str, severity: str = "CRITICAL") -> None:
        """Ask the collector to stop every rank (it picks the step and tells every rank)."""
        self._publisher.outbox.append(self._message(
            Kind.STOP_REQUEST, reason=str(reason)[:512], sev=str(severity),
            step=self._publisher.current_step))

    @property
    def stop_reason(self) -> str | None:
        """The reason of the stop state this rank accepted, or None."""
        return self._stop_reason

    @property
    def stop_at_step(self) -> int | None:
        """The step this rank will stop at, or None when no stop was decided."""
        return self._stop_at

    def _consider(self, offer: StopOffer | None, step: int) -> None:
        """Accept a new stop state unless this rank already passed its step; answer either way."""
        self._seen_offer = offer
        if offer is None:
            return
        passed = self._last_checked_step is not None and offer.stop_at_step <= self._last_checked_step
        if not passed:
            self._stop_at = offer.stop_at_step
            self._stop_reason = offer.reason
        self._publisher.outbox.append(self._message(
            Kind.STOP_ACK, gen=offer.generation, step=step, ok=not passed))

    def _agree_on_stop(self, step: int) -> bool:
        """MAX all-reduce of "I would stop now" across the process group: all or none stop."""
        local = self._stop_at is not None and step >= self._stop_at
        try:
            import torch
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                return local
            flag = torch.tensor([1.0 if local else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        except Exception:
            log.warning("rlmon: stop agreement failed; using the local stop state", exc_info=True)
            return local

    # -- queries -----------------------------------------------------------------------------------

    def query(self, q: str, timeout: float = 5.0, **args: Any) -> dict[str, Any] | None:
        """Ask the collector a question and wait for its answer (``docs/protocol.md``, QUERY):
        ``"alerts"``, ``"comparisons"``, ``"metrics"`` (``name=``, ``n=``), ``"ppo"``,
        ``"rewards"`` (``n=``, ``window=``), ``"stop"``.

        Blocking (up to ``timeout`` seconds), so never call it on the hot path. The query travels
        after everything logged before it. Never raises: None on timeout, after ``close``, or for a
        bad argument; an unknown question is answered ``{"error": ...}``."""
        try:
            if self._closed:
                return None
            message = self._message(Kind.QUERY, q=str(q), id=0)
            del message["id"]
            if args:
                message["args"] = dict(args)
            wire.encode(message)  # refuse what msgpack cannot carry here, not in the sender
            return self._publisher.query(message, float(timeout))
        except Exception:
            log.debug("rlmon: query %r failed", q, exc_info=True)
            return None

    # -- lifecycle ---------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """The ledger: ``log`` calls (``emitted``), steps acknowledged by the collector, dropped
        by reason, held unacknowledged, still queued (``pending``), batches sent, the highest
        acknowledged batch."""
        ledger = self._publisher.ledger
        return {"emitted": ledger.emitted, "acked": ledger.acked, "dropped": dict(ledger.dropped),
                "unacked": ledger.unacked, "batches_sent": ledger.batches_sent,
                "acked_seq": ledger.acked_seq, "pending": len(self._pending)}

    def close(self) -> None:
        """Flush and disconnect; with the collector gone this takes at most ``close_timeout`` + a
        little. Idempotent. An embedded collector is finalized (its reports written) here."""
        if self._closed:
            return
        if self._attached:
            self.log(max(self._publisher.current_step, 0), {})
        self._closed = True
        self._max_pending = 0  # every later log() is dropped and counted as "closed"
        if self._before_close is not None:
            self._before_close()
        self._publisher.close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self, kind: Kind, **fields: Any) -> dict[str, Any]:
        return wire.envelope(kind, self.run_id, self.rank, self._publisher.incarnation, **fields)

    def _restart_after_fork(self) -> None:
        """In a forked child (a DataLoader worker, say): forget the inherited sender without
        touching it (its thread does not exist here and its ZeroMQ context must not be used) and
        prepare a fresh one, with a new incarnation, that starts only if the child logs."""
        self._publisher = Publisher(self.config, self.endpoint, start=False)
        self._pending = self._publisher.pending
        # The parent's span timings and reward values are the parent's to send; the parent's
        # embedded collector (if any) is the parent's to finalize.
        self._attached, self._unstamped_rewards, self._reward_means = {}, [], {}
        self._on_close = self._before_close = None
        self.log = self._log_in_forked_child
        self.log_samples = self._log_samples_in_forked_child

    def _start_child_sender(self) -> None:
        del self.log, self.log_samples  # back to the class's methods
        self._publisher.start()
        # A multiprocessing child (a DataLoader worker) ends with os._exit after its finalizers,
        # skipping atexit: close (flush, BYE with the ledger) from a finalizer as well.
        atexit.register(self.close)
        multiprocessing.util.Finalize(self, self.close, exitpriority=100)

    def _log_in_forked_child(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._start_child_sender()
        self.log(step, metrics)

    def _log_samples_in_forked_child(self, step: int, prompts: Sequence[str],
                                     responses: Sequence[str],
                                     rewards: Sequence[float] | None = None) -> None:
        self._start_child_sender()
        self.log_samples(step, prompts, responses, rewards)


class NullMonitor:
    """The disabled monitor: same methods as :class:`Monitor`, every call a no-op."""

    rank = local_rank = 0
    world_size = 1
    run_id = ""
    endpoint = None
    stop_reason = None
    stop_at_step = None

    def __init__(self, config: RankConfig | None = None) -> None:
        if config is not None:
            self.rank, self.local_rank = config.rank, config.local_rank
            self.world_size, self.run_id = config.world_size, config.run_id

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Do nothing."""

    def log_samples(self, step: int, prompts: Sequence[str], responses: Sequence[str],
                    rewards: Sequence[float] | None = None) -> None:
        """Do nothing."""

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time nothing."""
        yield

    def wrap_rewards(self, functions: Sequence[Callable], names: Sequence[str] | None = None
                     ) -> list[Callable]:
        """The functions themselves, unwrapped."""
        return list(functions)

    def attach(self, values: Mapping[str, float]) -> None:
        """Do nothing."""

    def log_reward_values(self, step: int | None, name: str, values: Any) -> None:
        """Do nothing."""

    def should_checkpoint(self, step: int) -> bool:
        """Always False."""
        return False

    def should_stop(self, step: int) -> bool:
        """Always False."""
        return False

    def request_early_stop(self, reason: str, severity: str = "CRITICAL") -> None:
        """Do nothing."""

    def query(self, q: str, timeout: float = 5.0, **args: Any) -> dict[str, Any] | None:
        """No collector: always None."""
        return None

    def statistics(self) -> dict[str, Any]:
        """An empty ledger."""
        return {"emitted": 0, "acked": 0, "dropped": {}, "unacked": 0, "batches_sent": 0,
                "acked_seq": 0, "pending": 0}

    def close(self) -> None:
        """Do nothing."""

    def __enter__(self) -> NullMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _host_values(metrics: Mapping[str, Any]) -> HostValues:
    """Copy ``metrics``, turning tensors into numbers without a device synchronisation."""
    return HostValues((key, _host_value(value)) for key, value in metrics.items())


def _host_value(value: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type == "cpu":
            return tensor.item()
        host = tensor.to("cpu", non_blocking=True)
        event = torch.cuda.Event() if tensor.device.type == "cuda" else None
        if event is not None:
            event.record()
        return DeferredScalar(host, event)
    return value  # numpy scalars and the rest are resolved by the sender thread


def _to_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


_live_monitors: "weakref.WeakSet[Monitor]" = weakref.WeakSet()
_fork_handler_registered = False


def _register_fork_handler(monitor: Monitor) -> None:
    """Remember ``monitor`` so a forked child (e.g. a DataLoader worker) gets a fresh sender."""
    global _fork_handler_registered
    if not _fork_handler_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_restart_all_after_fork)
        _fork_handler_registered = True
    _live_monitors.add(monitor)


def _restart_all_after_fork() -> None:
    for monitor in list(_live_monitors):
        if not monitor._closed:
            monitor._restart_after_fork()
