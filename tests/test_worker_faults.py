"""Fail-closed behaviour under injected checker faults (errors, bad outputs, hangs).

The real checker cannot be made to raise or hang on demand, so these tests hand `GuardedChecker`
and `SafetyWorker` a stand-in checker with the same attributes the worker uses
(`text_guardrail.safety_models[*].is_safe`, `check_video_safety`). Nothing here imports
cosmos_guardrail.
"""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from safety_worker import SafetyClient
from safety_worker.server import GuardedChecker, SafetyWorker


class _Guard:
    def __init__(self, behaviour):
        self.behaviour = behaviour

    def is_safe(self, text):
        return self.behaviour(text)


def _checker(text_behaviour=lambda t: (True, "ok"), video=lambda f: f):
    return SimpleNamespace(text_guardrail=SimpleNamespace(safety_models=[_Guard(text_behaviour)]),
                           check_video_safety=video)


def _raise(*_):
    raise RuntimeError("guard exploded")


FRAMES = np.zeros((2, 8, 8, 3), np.uint8)


def test_text_guard_exception_is_blocked_not_safe():
    v = GuardedChecker(_checker(_raise)).check_text("hello")
    assert not v.safe and v.fault and v.stage == "text" and "guard exploded" in v.reason


@pytest.mark.parametrize("video", [
    _raise,
    lambda f: None,
    lambda f: f.astype(np.float32),
    lambda f: f[:1],
    lambda f: np.zeros((0,)),  # what cosmos_guardrail returns for T=0
])
def test_face_filter_error_or_wrong_output_is_blocked(video):
    v = GuardedChecker(_checker(video=video)).check_video(FRAMES)
    assert not v.safe and v.frames is None and v.reason and v.stage == "video"
    assert v.fault == (video(FRAMES.copy()) is not None if video is not _raise else True)  # None: the runner's own "blocked"


def test_checker_gets_a_private_copy_of_the_frames():
    def pixelate_in_place(f):
        f[:] = 255
        return f

    frames = FRAMES.copy()
    v = GuardedChecker(_checker(video=pixelate_in_place)).check_video(frames)
    assert v.safe and (v.frames == 255).all() and (frames == 0).all()


def test_checker_that_hangs_is_answered_blocked_at_the_check_timeout(tmp_path):
    release = threading.Event()

    def hang(text):
        release.wait(30)
        return True, "too late"

    worker = SafetyWorker(f"ipc://{tmp_path}/w.sock", lambda: _checker(hang), models={}, check_timeout=0.5)
    server = threading.Thread(target=worker.serve, daemon=True)
    server.start()
    try:
        with SafetyClient(worker.endpoint, timeout=20) as client:
            t = time.monotonic()
            v = client.check_text("anything")
            assert not v.safe and "timed out" in v.reason and time.monotonic() - t < 5
            assert client.ping()["instance_id"] == worker.instance_id  # still serving
            release.set()
            while client.stats()["checks"] < 1:  # the abandoned computation finishes late...
                time.sleep(0.01)
            stats = client.stats()
            # ...and its "safe" is dropped: the one verdict sent was blocked, stage timeout.
            assert (stats["timed_out"], stats["safe"], stats["blocked"]) == (1, 0, 1)
            assert stats["verdicts_by_stage"]["timeout"] == 1
    finally:
        release.set()
        worker.request_stop()
        server.join(10)
    assert not server.is_alive()


def _poisoned_video_checker(hold: threading.Event):
    """Frames that are all 255 make the face filter raise, alone or anywhere in a batch; the text
    "hold" keeps the checker busy until `hold` is set (so that the checks sent meanwhile queue up)."""
    def postprocess(frames):
        if (frames.reshape(len(frames), -1) == 255).all(axis=1).any():
            raise RuntimeError("poison frame")
        frames[:] //= 2  # a visible, per-frame "sanitization"
        return frames

    runner = SimpleNamespace(run_safety_check=lambda frames: (True, ""), postprocess=postprocess, postprocessors=[])
    text_guard = _Guard(lambda t: (hold.wait(30), "held") if t == "hold" else (True, "ok"))
    return SimpleNamespace(text_guardrail=SimpleNamespace(safety_models=[text_guard]),
                           video_guardrail=runner, check_video_safety=postprocess)


def test_a_batch_that_raises_is_retried_one_by_one_so_only_the_bad_input_is_blocked(tmp_path):
    hold = threading.Event()
    worker = SafetyWorker(f"ipc://{tmp_path}/w.sock", lambda: _poisoned_video_checker(hold), models={})
    server = threading.Thread(target=worker.serve, daemon=True)
    server.start()
    good = [np.full((1, 8, 8, 3), 10 * (i + 1), np.uint8) for i in range(3)]
    poison = np.full((1, 8, 8, 3), 255, np.uint8)
    try:
        with SafetyClient(worker.endpoint, timeout=20) as client:
            busy = client._submit("check_text", {"texts": ["hold"]}, [], lambda rep: rep)
            while client.stats()["running_checks"] < 1:  # the held check is running, alone
                time.sleep(0.01)
            futures = [client.submit_video(f) for f in (good[0], poison, good[1], good[2])]
            while client.stats()["queued"] < 4:  # all four wait behind the held check: one batch
                time.sleep(0.01)
            hold.set()
            busy.result(timeout=20)
            verdicts = [f.result(timeout=20) for f in futures]
            stats = client.stats()["batching"]
    finally:
        hold.set()
        worker.request_stop()
        server.join(10)
    assert [v.safe for v in verdicts] == [True, False, True, True]
    assert "fail closed" in verdicts[1].reason and "poison frame" in verdicts[1].reason
    for v, f in zip([verdicts[0], *verdicts[2:]], good):
        np.testing.assert_array_equal(v.frames, f // 2)
    assert stats["retried_one_by_one"] == 4 and stats["largest"] == 4  # one batch of four, then each alone
