"""CURVE keys for ingest and control across nodes (``rlmon keys DIR``).

Layout of a key directory::

    DIR/server.key           the collector's public key (give it to every rank and operator)
    DIR/server.key_secret    the collector's secret key (mode 0600; stays on the collector host)
    DIR/clients/NAME.key     a client's public key: the collector's allow-list is this folder
    DIR/clients/NAME.key_secret   that client's secret key (mode 0600; copy to the node using it)

A collector started with ``--curve-dir DIR`` serves CURVE only and lets in a client whose public
key is in ``DIR/clients`` (ZAP); a client with no key or another key never completes the
handshake, and the collector counts it (``rlmon_frames_rejected_total{reason="auth"}``). A rank
uses CURVE when ``RLMON_CURVE_SERVER_KEY`` (the collector's public key file) and
``RLMON_CURVE_CLIENT_SECRET`` (its own secret key file) are set. Only pyzmq is needed here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from rlmon.errors import ConfigError

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
#: Oldest libzmq the collector accepts (CVE fixes and the ZAP behaviour rlmon relies on).
MIN_LIBZMQ = (4, 3, 5)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a rank or an operator needs to reach a CURVE collector."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before ``connect``) a CURVE client of the collector."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def make_keys(directory: Path, clients: list[str]) -> list[Path]:
    """Create the server pair (unless present) and one pair per client name; return the files
    written. Secret files are mode 0600."""
    directory = Path(directory)
    (directory / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not (directory / f"{SERVER_NAME}.key_secret").exists():
        written += _create(directory, SERVER_NAME)
    for name in clients:
        if not name.isidentifier():
            raise ConfigError("--client", f"a client name is letters, digits and _: {name!r}")
        written += _create(directory / CLIENTS_DIR, name)
    return written


def _create(directory: Path, name: str) -> list[Path]:
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return [Path(public), Path(secret)]


def client_keys_from_env(env: dict[str, str] | os._Environ) -> ClientKeys | None:
    """The rank's CURVE keys from ``RLMON_CURVE_SERVER_KEY`` and ``RLMON_CURVE_CLIENT_SECRET``
    (None when neither is set; ConfigError when only one is, or a file is unreadable)."""
    server, client = env.get("RLMON_CURVE_SERVER_KEY"), env.get("RLMON_CURVE_CLIENT_SECRET")
    if not server and not client:
        return None
    if not (server and client):
        raise ConfigError("RLMON_CURVE_SERVER_KEY", "set both RLMON_CURVE_SERVER_KEY and "
                                                    "RLMON_CURVE_CLIENT_SECRET, or neither")
    return load_client_keys(Path(server), Path(client))


def load_client_keys(server_public_file: Path, client_secret_file: Path) -> ClientKeys:
    """Read a client's keys (ConfigError naming the file that cannot be read)."""
    server_public, _ = _load(server_public_file)
    public, secret = _load(client_secret_file)
    if secret is None:
        raise ConfigError(str(client_secret_file), "not a secret key file (*.key_secret)")
    return ClientKeys(server_public, public, secret)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot read a CURVE key: {exc}") from exc


def check_libzmq() -> None:
    """ConfigError when the linked libzmq is older than :data:`MIN_LIBZMQ` or lacks CURVE."""
    version = zmq.zmq_version_info()
    if version < MIN_LIBZMQ:
        wanted = ".".join(map(str, MIN_LIBZMQ))
        raise ConfigError("libzmq", f"libzmq {zmq.zmq_version()} is too old: rlmon needs {wanted} "
                                    "or newer (pip install -U pyzmq brings a bundled one)")


def check_curve() -> None:
    """ConfigError when this libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise ConfigError("--curve-dir", f"libzmq {zmq.zmq_version()} has no CURVE support")
