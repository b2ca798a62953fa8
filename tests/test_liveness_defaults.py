"""The liveness defaults: one set (safety_worker/liveness.py), used by every link to a worker, and
ordered so that a client does not give up on a supervised worker in the middle of its restart."""
import inspect

from safety_worker import SafetyClient, spawn_worker
from safety_worker.liveness import DEAD_AFTER_S, HANG_TIMEOUT_S, HEARTBEAT_S, PING_EVERY_S, Supervisor

TINY_RESTART_S = 6.0  # a tiny-preset worker's start, measured (docs/RELIABILITY.md)


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_a_hung_supervised_worker_is_restarted_before_its_clients_give_up():
    assert HEARTBEAT_S < PING_EVERY_S < HANG_TIMEOUT_S
    assert PING_EVERY_S + HANG_TIMEOUT_S + TINY_RESTART_S < DEAD_AFTER_S


def test_every_link_to_a_worker_uses_the_one_set(tmp_path):
    from theworld.inference.guard import Guard

    assert (_default(SafetyClient, "heartbeat"), _default(SafetyClient, "dead_after")) == (HEARTBEAT_S, DEAD_AFTER_S)
    assert (_default(Supervisor, "ping_every"), _default(Supervisor, "hang_timeout")) == (PING_EVERY_S, HANG_TIMEOUT_S)
    assert _default(spawn_worker, "hang_timeout") == HANG_TIMEOUT_S
    guard = Guard(f"ipc://{tmp_path}/nobody.sock")  # the server's link: no override of its own
    try:
        assert (guard._client.heartbeat, guard._client.dead_after) == (HEARTBEAT_S, DEAD_AFTER_S)
    finally:
        guard.close()
