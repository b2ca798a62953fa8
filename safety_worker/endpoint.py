"""The worker's client-facing endpoint, one place for the server and the `--replicas` front.

`claim_endpoint` applies the rules that decide whether an endpoint may be served at all (tcp needs
CURVE keys or an explicit --insecure; an ipc path lives in a private directory and is locked so a
second worker cannot silently steal it) and is called before anything slow, so a bad endpoint fails
fast. `bind_router` builds the ROUTER socket with the options every reply path relies on.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import zmq

LINGER_MS = 1000  # let queued replies leave before the context is terminated


class WorkerStartError(RuntimeError):
    """The worker cannot start (endpoint taken or unsafe, checkpoint missing...)."""


def claim_endpoint(endpoint: str, curve_dir: str | None = None, insecure: bool = False):
    """Check that `endpoint` may be served and take it; returns the ipc lock (keep it open while
    serving, then `release_endpoint`) or None. Raises WorkerStartError naming the fix."""
    if endpoint.startswith("tcp://") and not insecure and curve_dir is None:
        raise WorkerStartError(
            f"{endpoint}: tcp endpoints need CURVE authentication: pass --curve-dir DIR (keys from "
            "`python -m safety_worker keys DIR`), use an ipc:// endpoint, or pass --insecure to accept "
            "unauthenticated network clients"
        )
    if curve_dir is not None:
        from .security import CurveConfigError, check_server_dir

        try:
            check_server_dir(curve_dir)
        except CurveConfigError as e:
            raise WorkerStartError(str(e)) from None
    return claim_ipc_endpoint(endpoint)


def bind_router(ctx: zmq.Context, endpoint: str, max_message_bytes: int, curve_dir: str | None = None):
    """The bound ROUTER socket and its CURVE authenticator (None without `curve_dir`; `.stop()` it
    after closing the socket)."""
    sock = ctx.socket(zmq.ROUTER)
    # Without this a ROUTER silently drops replies to peers it cannot route to.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A bigger frame disconnects the peer before it is read into memory.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    auth = None
    if curve_dir is not None:  # before bind: the socket must be a CURVE server from the first peer on
        from .security import configure_curve_server

        auth = configure_curve_server(ctx, sock, curve_dir)
    sock.bind(endpoint)
    return sock, auth


def claim_ipc_endpoint(endpoint: str):
    """For ipc://PATH: make sure PATH's directory is private (0700, ours) and take PATH.lock.

    Binding an ipc path that another worker holds silently steals it, so a second worker must
    refuse instead. Returns the open lock file (keep it open while serving) or None for non-ipc.
    """
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    if not path.is_absolute():
        raise WorkerStartError(f"ipc endpoint {endpoint!r} must use an absolute path (ipc:///dir/worker.sock)")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    st = parent.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise WorkerStartError(
            f"ipc directory {parent} is not private (owner uid {st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))}): "
            f"any local user could connect. Make it private with `chmod 700 {parent}`, or put the socket in a new "
            f"directory of your own (the worker creates a missing one with mode 0700), e.g. ipc://{parent}/safety-worker/worker.sock"
        )
    lock = open(str(path) + ".lock", "a+")
    os.chmod(lock.name, 0o600)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise WorkerStartError(
            f"another safety worker (pid {holder}) is serving {endpoint}; stop it or pass a different --endpoint"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    if path.exists():  # left by a worker that died without cleaning up (we hold the lock now)
        path.unlink()
    return lock


def release_endpoint(endpoint: str, lock) -> None:
    """Undo `claim_endpoint`: remove the socket file, then drop the lock (None: nothing to do)."""
    if lock is not None:
        Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
        lock.close()
