"""``rlmon relay``: one per node, ZeroMQ's own proxy between that node's ranks and the collector.

The ranks of a node connect to the relay's ROUTER (the *frontend*, loopback by default) instead of
to the collector; the relay forwards every frame, in both directions, over one DEALER connection
(the *backend*) to the collector, with ``zmq.proxy_steerable`` (libzmq's proxy, in C, no Python
per message). The collector sees ``[relay id, rank id, frame]`` and answers along the same route
(docs/protocol.md, "Relays"), so acknowledgements, stop states and query answers reach their rank.
The collector then holds one connection per node instead of one per rank.

What a rank does not see through a relay is the collector restarting: its own connection, to the
relay, stays up. So when the backend connects again after its first connection, the relay closes
and re-binds its frontend; every rank sees a new connection and re-sends what was not yet
acknowledged, as it would after losing a direct connection.

libzmq's proxy sends blocking: while the collector takes nothing (gone, or its queue for this
relay full), the proxy waits, the ranks' queues to the relay fill, and the ranks hold their
batches (``send_hwm``, then the re-send buffer), exactly as with the collector unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import zmq

from exporters.atomic import atomic_write_text
from rlmon import wire
from rlmon.errors import ConfigError
from rlmon.keys import ClientKeys, check_libzmq, client_keys_from_env
from rlmon.launch import run_command

log = logging.getLogger("rlmon.relay")

#: Where ranks connect by default: a free loopback TCP port.
DEFAULT_BIND = "tcp://127.0.0.1:*"
#: Frames the backend queues toward the collector, and from it, before the proxy waits.
BACKEND_HWM = 100_000
#: Seconds to keep trying to re-bind the frontend's address after the collector reconnected.
REBIND_SECONDS = 10.0


class Relay:
    """A running relay. :meth:`start` binds and returns the frontend's address; :meth:`close`
    stops it. The proxy runs on a thread of its own; a second thread watches the backend's
    connection to re-bind the frontend when the collector comes back (module docstring)."""

    def __init__(self, collector_endpoint: str, bind: str = DEFAULT_BIND,
                 curve: ClientKeys | None = None) -> None:
        for flag, address in (("--collector", collector_endpoint), ("--bind", bind)):
            if not address.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(flag, f"not a ZeroMQ address: {address!r}")
        self.collector_endpoint = collector_endpoint
        self.bind = bind
        self.curve = curve
        name = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.routing_id = wire.RELAY_ID_PREFIX + name.encode()[-200:]
        """Its routing id at the collector: the prefix that lets it carry the ranks' ids."""
        self.endpoint = ""
        self.reconnections = 0
        """Times the backend connected again after its first connection (a collector restart)."""
        self._context: zmq.Context | None = None
        self._frontend: zmq.Socket | None = None
        self._backend: zmq.Socket | None = None
        self._control: zmq.Socket | None = None
        self._control_lock = threading.Lock()
        self._closing = threading.Event()
        self._proxy_thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind the frontend, connect the backend, start the proxy; return the frontend address."""
        check_libzmq()
        context = self._context = zmq.Context(io_threads=1)
        backend = self._backend = context.socket(zmq.DEALER)
        backend.setsockopt(zmq.ROUTING_ID, self.routing_id)
        backend.setsockopt(zmq.LINGER, 2000)  # the last BYEs still reach the collector
        backend.setsockopt(zmq.SNDHWM, BACKEND_HWM)
        backend.setsockopt(zmq.RCVHWM, BACKEND_HWM)
        if self.curve is not None:
            self.curve.apply(backend)
        connections = backend.get_monitor_socket(zmq.EVENT_CONNECTED)
        backend.connect(self.collector_endpoint)
        self._frontend = self._new_frontend(self.bind)
        self.endpoint = self._frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        proxy_end = context.socket(zmq.PAIR)
        address = f"inproc://rlmon-relay-control-{id(self)}"
        proxy_end.bind(address)
        self._control = context.socket(zmq.PAIR)
        self._control.connect(address)
        self._proxy_thread = threading.Thread(target=self._serve, args=(proxy_end,),
                                              name="rlmon-relay-proxy", daemon=True)
        self._watch_thread = threading.Thread(target=self._watch, args=(connections,),
                                              name="rlmon-relay-watch", daemon=True)
        self._proxy_thread.start()
        self._watch_thread.start()
        return self.endpoint

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the proxy and release the sockets. False when the proxy did not stop within
        ``timeout`` (it is blocked on a collector that takes nothing): the sockets are then left
        to the process's exit."""
        if self._closing.is_set() or self._proxy_thread is None:
            return True
        self._closing.set()
        self._command(b"TERMINATE")
        self._proxy_thread.join(timeout)
        if self._watch_thread is not None:
            self._watch_thread.join(timeout)
        if self._proxy_thread.is_alive():
            log.error("the relay's proxy did not stop within %.0f s: the collector at %s takes "
                      "nothing; frames still queued are dropped", timeout, self.collector_endpoint)
            return False
        for sock in (self._frontend, self._control, self._backend):
            if sock is not None:
                sock.close()
        self._context.term()
        return True

    @property
    def running(self) -> bool:
        """True while the proxy forwards (False once closed, or if re-binding failed)."""
        return self._proxy_thread is not None and self._proxy_thread.is_alive()

    # -- internals ---------------------------------------------------------------------------------

    def _new_frontend(self, address: str) -> zmq.Socket:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError("--bind", f"cannot bind {address}: {exc}") from exc
        return sock

    def _serve(self, proxy_end: zmq.Socket) -> None:
        """The proxy thread: forward until TERMINATE; then stop, or re-bind the frontend."""
        try:
            while True:
                zmq.proxy_steerable(self._frontend, self._backend, None, proxy_end)
                if self._closing.is_set():
                    return
                self._rebind_frontend()
        except zmq.ContextTerminated:
            return
        except Exception:
            log.exception("the relay's proxy stopped")
        finally:
            proxy_end.close(linger=0)

    def _rebind_frontend(self) -> None:
        """Close the frontend and bind its address again, so every rank reconnects and re-sends."""
        self._frontend.close(linger=0)
        deadline = time.monotonic() + REBIND_SECONDS
        while True:
            try:
                self._frontend = self._new_frontend(self.endpoint)
                return
            except ConfigError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the closed listener's port is released asynchronously

    def _watch(self, connections: zmq.Socket) -> None:
        """Count the backend's connections; on each after the first, have the proxy re-bind."""
        connected_before = False
        try:
            while not self._closing.is_set():
                if not connections.poll(200, zmq.POLLIN):
                    continue
                connections.recv_multipart()
                if connected_before:
                    self.reconnections += 1
                    log.warning("the collector at %s is back (reconnection %d): the ranks "
                                "reconnect and re-send what was not acknowledged",
                                self.collector_endpoint, self.reconnections)
                    self._command(b"TERMINATE")
                connected_before = True
        finally:
            connections.close(linger=0)

    def _command(self, command: bytes) -> None:
        """Send the proxy a command (never blocks: a proxy thread that ended reads none)."""
        with self._control_lock:
            if self._control is not None:
                try:
                    self._control.send(command, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass


def run_relay(collector_endpoint: str | None, bind: str, command: list[str],
              ready_file: str | None = None) -> int:
    """``rlmon relay``: start a relay to ``collector_endpoint`` (else ``RLMON_ENDPOINT``), with the
    CURVE keys of ``RLMON_CURVE_*`` for the link to the collector. With ``command``, run it with
    ``RLMON_ENDPOINT`` set to the relay (and the CURVE variables removed: the ranks' link to the
    relay is local) and return its exit code; without, serve until SIGINT/SIGTERM."""
    endpoint = collector_endpoint or os.environ.get("RLMON_ENDPOINT", "")
    if not endpoint:
        raise ConfigError("--collector", "give the collector's address (or set RLMON_ENDPOINT)")
    relay = Relay(endpoint, bind, client_keys_from_env(os.environ))
    frontend = relay.start()
    print(f"rlmon relay: ranks connect to {frontend}; forwarding to {endpoint}",
          file=sys.stderr, flush=True)
    if ready_file:
        atomic_write_text(Path(ready_file), json.dumps({"endpoint": frontend, "pid": os.getpid(),
                                                        "collector": endpoint}) + "\n")
    code = 0
    try:
        if command:
            env = {key: value for key, value in os.environ.items()
                   if not key.startswith("RLMON_CURVE_")}
            code = run_command(command, {**env, "RLMON_ENDPOINT": frontend})
        else:
            print(frontend, flush=True)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(0.5):
                if not relay.running:
                    print("rlmon relay: error: the proxy stopped (see the log above)",
                          file=sys.stderr)
                    code = 1
                    break
    finally:
        if not relay.close():
            sys.stderr.flush()
            os._exit(code or 1)  # the proxy is stuck on a collector that takes nothing
    return code
