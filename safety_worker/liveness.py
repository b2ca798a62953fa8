"""Keeping a spawned worker alive, and never leaving one behind (light: no torch).

`Supervisor` runs in the process that spawned a worker (`spawn_worker(restarts=N)`): it watches the
process sentinel (an exit is seen within `interval` seconds) and pings the worker every `ping_every`
seconds; a worker that exits abnormally, or does not answer a ping within `hang_timeout`, is killed
(SIGKILL) and started again on the *same* endpoint, with exponential backoff between attempts and at
most `restarts` restarts in all. Clients connected to that endpoint (`SafetyClient`) reconnect by
themselves and resend every request still owed, so nothing in flight is lost. A clean exit (code 0:
SIGTERM drain or owner `shutdown`) is not restarted. When the budget is spent the supervisor gives
up; clients then declare the worker dead after their `dead_after` and fail closed (`WorkerDead`).

(No orphans: `spawn_worker` passes `--parent-pid`, and the worker stops when its spawner is gone.)
"""
from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("safety_worker.liveness")

# The liveness defaults, one set for every link to a worker (SafetyClient, the server's guard, the
# trainer, the --replicas front's links to its replicas, the supervisor). They are ordered on purpose:
# a supervised worker that hangs is killed after at most PING_EVERY_S + HANG_TIMEOUT_S (35 s) and
# restarted (about 6 s for the tiny preset, longer for real weights), after which its clients resend
# what they were owed. DEAD_AFTER_S is longer than that, so a client declares a worker dead
# (`WorkerDead`, fail closed) only when it is not coming back, never in the middle of a restart that
# would have answered it. HANG_TIMEOUT_S is long enough for a worker busy with a batch on loaded
# cores to answer a ping (pings are answered between batches' replies, not queued behind them).
HEARTBEAT_S = 1.0  # a client pings this often while replies are owed
DEAD_AFTER_S = 60.0  # a client declares the worker dead after this much silence while replies are owed
PING_EVERY_S = 5.0  # the supervisor pings its worker this often
HANG_TIMEOUT_S = 30.0  # the supervisor kills and restarts a worker that leaves a ping unanswered this long


class Supervisor:
    """Restart a `WorkerProcess` that died or hung; see the module docstring."""

    def __init__(self, worker, restarts: int = 3, interval: float = 0.5, ping_every: float = PING_EVERY_S,
                 hang_timeout: float = HANG_TIMEOUT_S, backoff: float = 0.5):
        self.worker = worker
        self.ping_every = ping_every
        self.restarts_left = restarts
        self.interval = interval
        self.hang_timeout = hang_timeout
        self.backoff = backoff
        self.restarted = 0  # successful restarts so far
        self.gave_up: str | None = None
        self.events: list[str] = []  # what happened, for logs and tests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"Supervisor(pid {worker.pid})", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5 + self.hang_timeout)

    def _run(self) -> None:
        from .client import SafetyClient

        # One client for all pings: it reconnects by itself when the worker is restarted.
        with SafetyClient(self.worker.endpoint, timeout=self.hang_timeout, heartbeat=None, dead_after=None,
                          **self.worker.client_kwargs) as client:
            next_ping = time.monotonic() + self.ping_every
            while not self._stop.is_set():
                proc = self.worker.proc
                self._stop.wait(self.interval)
                if self._stop.is_set():
                    return
                if proc.poll() is not None:
                    if proc.returncode == 0:
                        self.events.append("exited cleanly (0); not restarted")
                        return
                    why = f"worker pid {proc.pid} exited with code {proc.returncode}"
                elif time.monotonic() < next_ping:
                    continue
                else:
                    next_ping = time.monotonic() + self.ping_every
                    if self._answers(client, proc):
                        continue
                    if self._stop.is_set() or proc.poll() is not None:
                        continue  # stopping, or it just exited: handled on the next turn
                    why = f"worker pid {proc.pid} did not answer a ping within {self.hang_timeout:g}s (hung)"
                    proc.kill()
                    proc.wait()
                if not self._restart(why):
                    return
                next_ping = time.monotonic() + self.ping_every

    def _answers(self, client, proc) -> bool:
        """True if the worker answered a ping at all: an error reply (`shutting_down` while it drains
        after SIGTERM, `busy`) proves it alive just as well."""
        from .client import WorkerError

        future = client._submit("ping", {}, [], lambda reply: reply.result)
        deadline = time.monotonic() + self.hang_timeout
        while time.monotonic() < deadline and not self._stop.is_set() and proc.poll() is None:
            try:
                future.result(timeout=0.2)
                return True
            except WorkerError:
                return True
            except TimeoutError:
                continue
            except Exception:
                return False
        future.cancel()
        return self._stop.is_set() or proc.poll() is not None

    def _restart(self, why: str) -> bool:
        delay = self.backoff
        while not self._stop.is_set():
            if self.restarts_left <= 0:
                self.gave_up = f"{why}; no restarts left"
                self.events.append(self.gave_up)
                logger.error("safety worker supervisor gives up: %s", self.gave_up)
                return False
            self.restarts_left -= 1
            logger.warning("%s; restarting it on %s", why, self.worker.endpoint)
            try:
                self.worker.restart()
            except Exception as e:
                why = f"restart failed: {e}"
                self.events.append(why)
                self._stop.wait(delay)
                delay *= 2
                continue
            self.restarted += 1
            self.events.append(f"{why}; restarted as pid {self.worker.pid}")
            return True
        return False
