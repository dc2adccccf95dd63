"""CURVE keys for the optional TCP control endpoint (ZeroMQ's certificate files).

Daemon, ``control_curve_dir`` in pcibackd.toml:
    server.key_secret     the daemon's key pair (0600, root)
    clients/<name>.key    public keys of the clients allowed in (read at start)
Client, ``pcibackctl --curve-dir DIR``:
    server.key            the daemon's public key
    client.key_secret     this client's key pair

``pcibackctl keygen DIR NAME`` writes ``NAME.key`` and ``NAME.key_secret``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class CurveError(RuntimeError):
    pass


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot load CURVE key {path}: {exc}") from None
    if secret and secret_key is None:
        raise CurveError(f"{path} holds no secret key")
    return public, secret_key


def server_keys(curve_dir: str | Path) -> tuple[bytes, bytes]:
    """The daemon's (public, secret) key; refused unless only its owner can read it."""
    path = Path(curve_dir) / "server.key_secret"
    try:
        st = path.stat()
    except OSError as exc:
        raise CurveError(f"no CURVE server key: {exc} (create it: pcibackctl keygen {curve_dir} server)") from None
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise CurveError(f"{path} must be owned by uid {os.geteuid()} and not readable by others (chmod 600)")
    return _load(path, secret=True)


def clients_dir(curve_dir: str | Path) -> Path:
    return Path(curve_dir) / "clients"


def start_authenticator(zctx: zmq.Context, curve_dir: str | Path):
    """A ZAP handler (pyzmq's, in its own thread) letting in only the clients/ keys."""
    allowed = clients_dir(curve_dir)
    if not allowed.is_dir():
        raise CurveError(f"no {allowed} directory of allowed client keys")
    auth = ThreadAuthenticator(zctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    return auth


def client_keys(curve_dir: str | Path) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a TCP client."""
    d = Path(curve_dir)
    server_public, _ = _load(d / "server.key", secret=False)
    public, secret = _load(d / "client.key_secret", secret=True)
    return server_public, public, secret


def keygen(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (0600) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)
