"""CURVE authentication and encryption for tcp:// workers (`zmq.auth`; light: no torch).

CURVE does not apply to ipc:// (that is protected by its 0700 directory and lock file, see
`endpoint.claim_endpoint`); on tcp:// it is required unless `serve --insecure` is given.

A key directory (`python -m safety_worker keys DIR`) holds:

    DIR/server.key, DIR/server.key_secret    the worker's key pair (the secret file is 0600)
    DIR/client.key, DIR/client.key_secret    a client key pair
    DIR/authorized/*.key                     public keys of the clients the worker accepts

The worker (`serve --curve-dir DIR`) loads its secret key and accepts a client only if the client's
public key is in DIR/authorized/ (ZAP handler: `zmq.auth.thread.ThreadAuthenticator`). A client
(`SafetyClient(..., curve_server_key=..., curve_keys_dir=DIR)`, or `check/status --curve-dir DIR`)
needs the worker's public key and its own key pair. A client with the wrong keys is not answered:
its handshake is refused before any message reaches the worker.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"


class CurveConfigError(RuntimeError):
    """A CURVE key directory is missing a file or is readable by others."""


def create_keys(directory: str | os.PathLike) -> dict[str, str]:
    """Write a server and a client key pair into `directory` (0700) and authorize the client."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    (d / AUTHORIZED).mkdir(mode=0o700, exist_ok=True)
    paths = {}
    for name in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(str(d), name)
        os.chmod(secret, 0o600)
        paths[name] = public
    shutil.copy(paths[CLIENT], d / AUTHORIZED / f"{CLIENT}.key")
    return {"server_public": paths[SERVER], "client_public": paths[CLIENT], "authorized": str(d / AUTHORIZED)}


def _load_pair(directory: str | os.PathLike, name: str) -> tuple[bytes, bytes]:
    import zmq.auth

    secret_file = Path(directory) / f"{name}.key_secret"
    if not secret_file.exists():
        raise CurveConfigError(f"{secret_file} is missing; create keys with `python -m safety_worker keys {directory}`")
    if secret_file.stat().st_mode & 0o077:
        raise CurveConfigError(f"{secret_file} is readable by other users; `chmod 600 {secret_file}`")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise CurveConfigError(f"{secret_file} holds no secret key")
    return public, secret


def server_public_key(directory: str | os.PathLike) -> bytes:
    import zmq.auth

    public, _ = zmq.auth.load_certificate(str(Path(directory) / f"{SERVER}.key"))
    return public


def check_server_dir(directory: str | os.PathLike) -> tuple[bytes, bytes]:
    """The worker's key pair, after checking DIR is usable (raises CurveConfigError naming the fix)."""
    public, secret = _load_pair(directory, SERVER)
    authorized = Path(directory) / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise CurveConfigError(f"{authorized} holds no client public key (*.key): no client could connect")
    return public, secret


def configure_curve_server(ctx: zmq.Context, sock: zmq.Socket, directory: str | os.PathLike):
    """Make `sock` a CURVE server that admits only the public keys in DIR/authorized/.

    Returns the started authenticator thread; call `.stop()` on it when the socket is closed."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = check_server_dir(directory)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(Path(directory) / AUTHORIZED))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def configure_curve_client(sock: zmq.Socket, server_key: bytes | str, keys_dir: str | os.PathLike | None = None) -> None:
    """Make `sock` a CURVE client of the worker whose public key (z85) is `server_key`.

    The client's own pair comes from `keys_dir/client.key_secret`; without `keys_dir` a fresh pair
    is generated (the worker then refuses it unless its public key is authorized)."""
    if keys_dir is not None:
        public, secret = _load_pair(keys_dir, CLIENT)
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
