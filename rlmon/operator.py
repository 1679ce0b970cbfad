"""Operator commands that talk to a running collector (``rlmon stop``).

An operator proves it may stop the run by holding the control key that the collector wrote, mode
0600, into the run directory; requests without it are refused and counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import zmq

from rlmon import wire
from rlmon.errors import CollectorUnavailable
from rlmon.keys import ClientKeys, client_keys_from_env
from rlmon.wire import Kind


def read_collector_info(run_dir: Path) -> dict[str, Any]:
    """``collector.json`` of a run directory, or :class:`CollectorUnavailable`."""
    try:
        return json.loads((Path(run_dir) / "collector.json").read_text())
    except (OSError, ValueError) as exc:
        raise CollectorUnavailable(f"no readable collector.json in {run_dir}: {exc}") from exc


def request_stop(run_dir: Path, reason: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the run's collector for a coordinated stop; return the stop state it answers with."""
    info = read_collector_info(run_dir)
    key = Path(info.get("control_key_file", Path(run_dir) / "control.key")).read_text().strip()
    request = wire.envelope(Kind.STOP_REQUEST, info.get("run_id", ""), -1, 0,
                            reason=reason, sev="CRITICAL", key=key)
    reply = _exchange(info["endpoint"], wire.encode(request), timeout, _operator_keys(info))
    if reply.kind is Kind.REFUSED:
        raise CollectorUnavailable(f"the collector refused the request: {reply.fields['why']}")
    fields = reply.fields
    return {"generation": fields["gen"], "stop_at_step": fields["at"], "reason": fields["reason"],
            "severity": fields["sev"], "source": fields.get("src", "")}


def _operator_keys(info: dict[str, Any]) -> ClientKeys | None:
    """CURVE keys for a collector that requires them: ``RLMON_CURVE_SERVER_KEY`` (default: the
    ``curve_server_key`` in collector.json) and ``RLMON_CURVE_CLIENT_SECRET``."""
    env = dict(os.environ)
    if info.get("curve_server_key") and not env.get("RLMON_CURVE_SERVER_KEY"):
        env["RLMON_CURVE_SERVER_KEY"] = info["curve_server_key"]
        if not env.get("RLMON_CURVE_CLIENT_SECRET"):
            raise CollectorUnavailable("this collector requires CURVE: set "
                                       "RLMON_CURVE_CLIENT_SECRET to a client key (rlmon keys)")
    return client_keys_from_env(env)


def _exchange(endpoint: str, frame: bytes, timeout: float,
              keys: ClientKeys | None = None) -> wire.Message:
    """Send one frame on a fresh DEALER and wait up to ``timeout`` s for a STOP_STATE/REFUSED."""
    context = zmq.Context(io_threads=1)
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    try:
        sock.connect(endpoint)
        sock.send(frame)
        deadline_ms = int(timeout * 1000)
        while sock.poll(deadline_ms, zmq.POLLIN):
            message = wire.decode(sock.recv())
            if message.kind in (Kind.STOP_STATE, Kind.REFUSED):
                return message
        raise CollectorUnavailable(f"no answer from the collector at {endpoint} in {timeout} s")
    finally:
        sock.close(linger=0)
        context.term()
