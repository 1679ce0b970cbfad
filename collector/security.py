"""The collector's side of CURVE: a ZAP authenticator with an allow-list of client keys, and a
count of the clients it refused.

:class:`CurveGuard` makes the collector's ROUTER socket a CURVE server, starts pyzmq's
``ThreadAuthenticator`` (ZAP) over the public keys in ``DIR/clients``, and watches the socket's
monitor for failed handshakes, which :meth:`CurveGuard.refusals` counts (``rlmon keys`` makes the
keys; see :mod:`rlmon.keys`).
"""

from __future__ import annotations

from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from rlmon.errors import ConfigError
from rlmon.keys import CLIENTS_DIR, SERVER_NAME, check_curve

#: Monitor events that mean a peer was refused during the handshake.
_REFUSED_EVENTS = (getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)
                   | getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0)
                   | getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0))


class CurveGuard:
    """CURVE + ZAP for one server socket. Owned by the receive loop; :meth:`close` ends it."""

    def __init__(self, context: zmq.Context, key_dir: Path) -> None:
        check_curve()
        key_dir = Path(key_dir)
        secret_file, allowed = key_dir / f"{SERVER_NAME}.key_secret", key_dir / CLIENTS_DIR
        if not secret_file.exists():
            raise ConfigError("--curve-dir", f"no {secret_file.name} in {key_dir} (run rlmon keys)")
        if not allowed.is_dir() or not any(allowed.glob("*.key")):
            raise ConfigError("--curve-dir", f"no client public keys in {allowed} (rlmon keys "
                                             f"{key_dir} --client NAME)")
        self.public, self.secret = zmq.auth.load_certificate(str(secret_file))
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(allowed))
        self._monitor: zmq.Socket | None = None
        self.refused = 0

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before ``bind``) a CURVE server and watch its handshakes."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        self._monitor = sock.get_monitor_socket(_REFUSED_EVENTS)

    def refusals(self) -> int:
        """Handshakes refused so far (reads what the monitor reported since the last call)."""
        while self._monitor is not None:
            try:
                recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.refused += 1
        return self.refused

    def close(self) -> None:
        """Stop the authenticator and the monitor."""
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._auth.stop()
