"""The safety worker: process boundary, verdicts, equivalence with the in-process checker, many clients."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from safety_worker import SafetyClient, WorkerError, spawn_worker
from safety_worker.tiny import (
    BLOCKED_PHRASE, BLOCKLIST_WORD, CONTROVERSIAL_PHRASE, EXACT_MATCH_WORD, SAFE_EXAMPLE, UNPARSEABLE_PHRASE,
)

from fixtures_worker import REPO_ROOT

TEXTS = [SAFE_EXAMPLE, f"Please {BLOCKED_PHRASE} tonight.", f"a {BLOCKLIST_WORD} on the table",
         f"the {EXACT_MATCH_WORD} sings", "Dogs chase balls in the park."]


def _frames(seed=0, shape=(3, 64, 64, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def client(worker_front):
    """A client of each worker front in turn (single worker, `serve --replicas 2`): same answers."""
    with SafetyClient(worker_front.endpoint, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def faces_client(tiny_safety_worker_faces):
    with SafetyClient(tiny_safety_worker_faces.endpoint, timeout=60) as c:
        yield c


def test_client_keeps_grad_while_worker_has_it_off(client):
    hello = client.hello()
    assert hello["grad_enabled"] is False
    assert hello["modules_loaded"] == {"cosmos_guardrail": True, "retinaface": True}
    # This pytest process is a client process too.
    assert torch.is_grad_enabled()
    assert "cosmos_guardrail" not in sys.modules and "retinaface" not in sys.modules


def test_separate_client_process_trains_with_grad_after_talking_to_worker(tiny_safety_worker):
    code = textwrap.dedent(f"""
        import sys, json, numpy as np, torch
        from safety_worker import SafetyClient
        with SafetyClient({tiny_safety_worker.endpoint!r}) as c:
            hello = c.hello()
            v = c.check_sample("a cat", np.zeros((1, 32, 32, 3), np.uint8))
        w = torch.ones(2, requires_grad=True)
        (w * 3).sum().backward()
        print(json.dumps({{"grad": torch.is_grad_enabled(), "wgrad": w.grad.tolist(), "safe": v.safe,
            "leaked": [m for m in ("cosmos_guardrail", "retinaface") if m in sys.modules],
            "worker_grad": hello["grad_enabled"], "worker_modules": hello["modules_loaded"]}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=60).stdout)
    assert out == {"grad": True, "wgrad": [3.0, 3.0], "safe": True, "leaked": [], "worker_grad": False,
                   "worker_modules": {"cosmos_guardrail": True, "retinaface": True}}


def test_importing_the_client_side_imports_no_torch():
    code = ("import sys, safety_worker; from safety_worker import SafetyClient, spawn_worker; "
            "print([m for m in ('torch', 'cosmos_guardrail', 'retinaface', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT))).stdout
    assert out.strip() == "[]"


def test_hello_reports_identity_versions_models_and_limits(worker_front, client):
    hello = client.hello()
    assert hello["pid"] == worker_front.pid
    assert hello["protocol"][0] == 1 and len(hello["instance_id"]) == 32
    assert hello["versions"]["cosmos-guardrail"] == "0.3.2" and hello["versions"]["torch"]
    assert hello["models"]["preset"] == "tiny" and hello["models"]["text_guard_repo"] == "Qwen/Qwen3Guard-Gen-0.6B"
    assert hello["limits"]["max_frames"] > 0 and hello["limits"]["queue_size"] > 0
    # The default --controversial. (`fail_closed` is a constant of the reply: that a failing guard blocks is
    # shown by tests/test_worker_faults.py, not by the flag.)
    assert hello["policy"]["controversial"] == "block"


def test_safe_text_passes_and_blocked_phrase_is_blocked(client):
    safe, blocked = client.check_text([SAFE_EXAMPLE, f"how do I {BLOCKED_PHRASE}?"])
    assert safe.safe and not blocked.safe
    assert "Unsafe" in blocked.reason and "Violent Crimes." in blocked.reason
    assert client.check_text(SAFE_EXAMPLE).safe


def test_blocklist_words_are_blocked(client):
    custom, exact = client.check_text([f"one {BLOCKLIST_WORD}", f"a {EXACT_MATCH_WORD} here"])
    assert not custom.safe and custom.reason.startswith("BLOCKLIST")
    assert not exact.safe and "exact match" in exact.reason


def test_controversial_is_blocked_by_default_policy(client):
    v = client.check_text(f"let us {CONTROVERSIAL_PHRASE}")
    assert not v.safe and "Controversial" in v.reason


def test_unparseable_guard_answer_is_blocked(client):
    v = client.check_text(UNPARSEABLE_PHRASE)
    assert not v.safe and "fail closed" in v.reason


def test_no_face_worker_returns_frames_untouched(client):
    frames = _frames(1)
    v = client.check_video(frames)
    assert v.safe and v.stage is None
    np.testing.assert_array_equal(v.frames, frames)


def test_face_worker_pixelates_every_frame_and_leaves_caller_array_alone(faces_client):
    frames = _frames(2)
    before = frames.copy()
    v = faces_client.check_video(frames)
    assert v.safe and v.frames.shape == frames.shape and v.frames.dtype == np.uint8
    assert all((v.frames[t] != frames[t]).any() for t in range(len(frames)))
    np.testing.assert_array_equal(frames, before)
    again = faces_client.check_video(frames)  # deterministic
    np.testing.assert_array_equal(again.frames, v.frames)


def test_check_sample_checks_text_and_frames_in_one_round_trip(faces_client):
    frames = _frames(3, (2, 48, 64, 3))
    ok = faces_client.check_sample(SAFE_EXAMPLE, frames)
    assert ok.safe and ok.frames.shape == frames.shape and not np.array_equal(ok.frames, frames)
    blocked = faces_client.check_sample(f"{BLOCKED_PHRASE}!", frames)
    assert not blocked.safe and blocked.stage == "text" and blocked.frames is None
    text_only = faces_client.check_sample(SAFE_EXAMPLE)
    assert text_only.safe and text_only.frames is None


def test_negative_strides_are_sent_as_a_contiguous_copy(faces_client):
    frames = _frames(4)
    flipped = frames[:, ::-1, ::-1]
    before = flipped.copy()
    v = faces_client.check_video(flipped)
    np.testing.assert_array_equal(v.frames, faces_client.check_video(np.ascontiguousarray(flipped)).frames)
    np.testing.assert_array_equal(flipped, before)


@pytest.mark.parametrize("bad, code", [
    (np.zeros((2, 8, 8, 3), np.float32), "bad_array"),
    (np.zeros((8, 8, 3), np.uint8), "bad_array"),
    (np.zeros((2, 8, 8, 4), np.uint8), "bad_array"),
    (np.zeros((2, 3, 8, 8), np.uint8), "bad_array"),  # channels first
    (np.zeros((0, 8, 8, 3), np.uint8), "bad_array"),
    (np.zeros((1, 4097, 1, 3), np.uint8), "too_large"),
])
def test_bad_frames_get_a_clear_error_and_the_worker_keeps_serving(client, bad, code):
    with pytest.raises(WorkerError) as err:
        client.check_video(bad)
    assert err.value.code == code and "frame" in err.value.message
    assert client.check_text(SAFE_EXAMPLE).safe


EQUIV_FRAMES = [((3, 64, 64, 3), 10), ((2, 40, 56, 3), 11)]
FAIL_OPEN_TEXTS = [CONTROVERSIAL_PHRASE, UNPARSEABLE_PHRASE]


@pytest.fixture(scope="module")
def in_process(run_in_checker_process):
    """Verdicts and frames from the real checker called in-process (in a subprocess), faces="all"."""
    return run_in_checker_process(f"""
        frames = [np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8) for shape, seed in {EQUIV_FRAMES!r}]
        print(json.dumps({{
            "text": [checker.check_text_safety(t) for t in {TEXTS!r}],
            "fail_open_text": [checker.check_text_safety(t) for t in {FAIL_OPEN_TEXTS!r}],
            "frames": [checker.check_video_safety(f.copy()).tolist() for f in frames],
            "grad": torch.is_grad_enabled()}}))
    """, faces="all")


def test_worker_verdicts_and_frames_equal_in_process_checker(faces_client, in_process):
    assert in_process["grad"] is False  # the reason the checker lives in its own process
    assert [v.safe for v in faces_client.check_text(TEXTS)] == in_process["text"]
    for (shape, seed), expected in zip(EQUIV_FRAMES, in_process["frames"]):
        got = faces_client.check_video(_frames(seed, shape)).frames
        np.testing.assert_array_equal(got, np.array(expected, dtype=np.uint8))


def test_cosmos_fails_open_where_the_worker_fails_closed(faces_client, in_process):
    assert in_process["fail_open_text"] == [True, True]  # cosmos_guardrail: "Controversial" and no label are safe
    assert [v.safe for v in faces_client.check_text(FAIL_OPEN_TEXTS)] == [False, False]


def test_many_requests_in_flight_are_routed_by_id(client):
    texts = [f"sample {i} " + (BLOCKED_PHRASE if i % 3 == 0 else "a calm lake") for i in range(30)]
    futures = [client.submit_sample(t, _frames(i, (1, 16, 16, 3))) for i, t in enumerate(texts)]
    verdicts = [f.result(timeout=60) for f in futures]
    assert [v.safe for v in verdicts] == [i % 3 != 0 for i in range(30)]
    for i, v in enumerate(verdicts):
        if v.safe:
            np.testing.assert_array_equal(v.frames, _frames(i, (1, 16, 16, 3)))



def test_abandoned_future_cannot_be_cancelled_and_the_client_keeps_working(client):
    fut = client.submit_sample("a calm lake", _frames(0, (1, 16, 16, 3)))
    assert not fut.cancel()  # already sent: cancelling would orphan the reply
    assert fut.result(timeout=60).safe
    assert client.check_sample("a calm lake", _frames(1, (1, 16, 16, 3))).safe

CLIENT_PROCESS = textwrap.dedent("""
    import sys, json, numpy as np
    from safety_worker import SafetyClient
    from safety_worker.tiny import BLOCKED_PHRASE
    endpoint, k = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(k)
    with SafetyClient(endpoint, timeout=120) as c:
        frames = [rng.integers(0, 256, (1, 24, 24, 3), dtype=np.uint8) for _ in range(12)]
        texts = [f"client {k} item {i} " + (BLOCKED_PHRASE if (i + k) % 2 else "a calm lake") for i in range(12)]
        futs = [c.submit_sample(t, f) for t, f in zip(texts, frames)]
        ok = 0
        for i, (fut, f) in enumerate(zip(futs, frames)):
            v = fut.result()
            expect_safe = (i + k) % 2 == 0
            ok += v.safe == expect_safe and (not v.safe or np.array_equal(v.frames, f))
    print(json.dumps({"ok": ok}))
""")


def test_four_client_processes_at_once(tiny_safety_worker):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT_PROCESS, tiny_safety_worker.endpoint, str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(4)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    assert [json.loads(out)["ok"] for out, _ in results] == [12] * 4


def test_local_checkpoint_directories_serve_the_same_checker(tiny_guardrail_root, tiny_safety_worker_faces, faces_client):
    from safety_worker.tiny import GUARDRAIL_REPO, TEXT_GUARD_REPO, variant_key

    hub = tiny_guardrail_root / variant_key("all") / "hub"
    snapshot = lambda repo: next((hub / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir())  # noqa: E731
    frames = _frames(12, (2, 32, 32, 3))
    with spawn_worker(preset="local", extra_args=["--guardrail-dir", str(snapshot(GUARDRAIL_REPO)),
                                                  "--text-guard-dir", str(snapshot(TEXT_GUARD_REPO))]) as worker, \
            SafetyClient(worker.endpoint, timeout=60) as c:
        assert worker.hello["models"]["preset"] == "local"
        assert [v.safe for v in c.check_text(TEXTS)] == [v.safe for v in faces_client.check_text(TEXTS)]
        np.testing.assert_array_equal(c.check_video(frames).frames, faces_client.check_video(frames).frames)


def test_prompts_are_not_written_to_the_worker_log(tiny_safety_worker):
    secret = f"my-unique-secret-7f3a {BLOCKED_PHRASE}"
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as client:
        assert not client.check_text(secret).safe
        assert client.check_text("another-unique-secret-91b2").safe
    log = open(tiny_safety_worker.log_path).read()
    assert log  # the worker did write its log (model loading)
    assert "unique-secret" not in log and BLOCKED_PHRASE not in log


def test_fault_tells_a_failed_check_from_a_judged_content(client):
    """`Verdict.fault`: blocked because the check failed (here: an answer without a label), not
    because the content was judged unsafe; the proxy's cache reuses only judged verdicts."""
    from safety_worker import protocol as P
    from safety_worker.proxy import _cacheable

    unsafe, unlabeled, safe = client.check_text([BLOCKED_PHRASE, UNPARSEABLE_PHRASE, SAFE_EXAMPLE])
    assert (unsafe.safe, unsafe.stage, unsafe.fault) == (False, "text", False)
    assert (unlabeled.safe, unlabeled.stage, unlabeled.fault) == (False, "text", True)
    assert (safe.safe, safe.stage, safe.fault) == (True, None, False)
    reply = lambda *vs: P.Reply(1, "ok", result={"verdicts": [v.to_wire() for v in vs]})  # noqa: E731
    assert _cacheable(reply(unsafe, safe)) and not _cacheable(reply(safe, unlabeled))
    assert P.Verdict.from_wire(unlabeled.to_wire()) == unlabeled
