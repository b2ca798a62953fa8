"""The safety filter in the training data path: against real tiny workers, and its own invariants
(accounting, resume state) against a scripted client."""
import json
import time
from concurrent.futures import Future

import numpy as np
import pytest

from safety_worker import SafetyClient, Verdict, WorkerError
from theworld.data.safety_filter import SafetyCheckFailed, SafetyFilter
from theworld.data.sources import BadSample, SampleStream, sample_text
from theworld.data.synthetic import SyntheticWorldTask


class InFlightCounter:
    """The real client, with a count of the checks submitted and not yet answered."""

    def __init__(self, client):
        self.client, self.outstanding, self.max_outstanding = client, 0, 0

    def submit_sample(self, text, frames):
        future = self.client.submit_sample(text, frames)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        future.add_done_callback(lambda _: setattr(self, "outstanding", self.outstanding - 1))
        return future


def test_the_model_only_sees_the_workers_sanitized_frames(tmp_path, tiny_safety_worker_faces):
    """With a face filter that pixelates every frame, every image handed on differs from the original."""
    task = SyntheticWorldTask(size=8, image_size=64)
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client:
        filtered = SafetyFilter(client, SampleStream(task, shuffle=False).iter_from(0), window=4, output_dir=tmp_path)
        for _ in range(4):
            position, sample = next(filtered)
            original = task[position]["images"][0]
            assert sample["images"][0].shape == original.shape and sample["images"][0].dtype == np.uint8
            assert not np.array_equal(sample["images"][0], original)
        filtered.close()


def test_window_bounds_the_checks_in_flight_and_waiting_is_timed(tmp_path, tiny_safety_worker):
    task = SyntheticWorldTask(size=32)
    with SafetyClient(tiny_safety_worker.endpoint) as client:
        counter = InFlightCounter(client)
        filtered = SafetyFilter(counter, SampleStream(task).iter_from(0), window=5, output_dir=tmp_path)
        started = time.perf_counter()
        for _ in range(20):
            next(filtered)
        elapsed = time.perf_counter() - started
        filtered.close()
    assert 1 < counter.max_outstanding <= 5
    # The first sample alone waits for a check (the window starts empty); waiting is part of the elapsed time.
    assert 0 < filtered.counts.wait_seconds <= elapsed and filtered.counts.passed == 20


def test_the_processes_of_a_node_keep_no_more_checks_in_flight_than_the_worker_queues(tiny_safety_worker, monkeypatch):
    """More than the worker's queue in flight would be answered `busy` (two default ranks kept 128 against
    64, and the held-out check once failed when resends ran out): each process keeps its share."""
    from types import SimpleNamespace

    from theworld.training.worker_session import local_processes, safety_window_share

    with SafetyClient(tiny_safety_worker.endpoint) as client:
        hello = client.hello()
    assert hello["limits"]["queue_size"] == 64
    assert [safety_window_share(64, hello, n) for n in (1, 2, 3, 100)] == [64, 32, 21, 1]
    assert safety_window_share(16, hello, 2) == 16 and safety_window_share(64, {}, 2) == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_processes(SimpleNamespace(num_processes=8)) == 2  # two nodes of 2 processes: 2 per worker
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_processes(SimpleNamespace(num_processes=1)) == 1


def test_failed_checks_are_counted_ledgered_and_never_handed_on(tmp_path, tiny_safety_worker):
    task = SyntheticWorldTask(size=6)
    samples = [task[i] for i in range(6)]
    samples[1] = {**samples[1], "images": [samples[1]["images"][0][..., 0]]}  # grayscale: the worker rejects it
    samples[3] = {**samples[3], "images": []}  # nothing to check
    with SafetyClient(tiny_safety_worker.endpoint) as client:
        filtered = SafetyFilter(client, enumerate(samples), window=3, output_dir=tmp_path)
        handed_on = [sample["id"] for _, sample in filtered]
        filtered.close()
    assert handed_on == [samples[i]["id"] for i in (0, 2, 4, 5)]
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [samples[1]["id"], samples[3]["id"]] and all(e["error"] for e in errors)
    counts = filtered.counts
    assert (counts.seen, counts.passed, counts.blocked, counts.errors) == (6, 4, 0, 2)


def test_a_worker_that_keeps_failing_stops_the_run_with_a_clear_error(tmp_path, tiny_safety_worker):
    task = SyntheticWorldTask(size=8)
    # Grayscale frames: each sample reaches the worker, which rejects it (an error reply, not a verdict).
    broken = ({**task[i], "images": [task[i]["images"][0][..., 0]]} for i in range(8))
    with SafetyClient(tiny_safety_worker.endpoint) as client:
        filtered = SafetyFilter(client, enumerate(broken), window=2, output_dir=tmp_path, max_errors=3)
        with pytest.raises(SafetyCheckFailed, match="safety_max_errors"):
            list(filtered)
        filtered.close()


class SubmitCounter(InFlightCounter):
    """The real client, counting what reaches the worker (and answering `hello` for the filter)."""

    def __init__(self, client):
        super().__init__(client)
        self.submitted = 0

    def hello(self):
        return self.client.hello()

    def submit_sample(self, text, frames):
        self.submitted += 1
        return super().submit_sample(text, frames)


@pytest.mark.parametrize("window", [3, 12])
def test_a_second_epoch_reuses_verdicts_and_sanitized_frames_instead_of_checking_again(tmp_path, tiny_safety_worker_faces,
                                                                                        window):
    """Two epochs over 6 samples (one blocked): the worker checks each content once, also when the window
    holds both reads of a sample at once (12); the second epoch hands on the same sanitized frames and
    ledgers the blocked sample again at its new position."""
    from safety_worker.tiny import BLOCKED_PHRASE

    task = SyntheticWorldTask(size=6, image_size=64)
    samples = [task[i] for i in range(6)]
    samples[2] = {**samples[2], "messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"What is it? {BLOCKED_PHRASE}"}]}, samples[2]["messages"][1]]}
    two_epochs = enumerate(samples + samples)
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client:
        counter = SubmitCounter(client)
        filtered = SafetyFilter(counter, two_epochs, window=window, output_dir=tmp_path, reuse_mb=64)
        handed_on = list(filtered)
        filtered.close()
    assert counter.submitted == 6
    assert [p for p, _ in handed_on] == [0, 1, 3, 4, 5, 6, 7, 9, 10, 11]
    for (_, first), (_, second) in zip(handed_on[:5], handed_on[5:]):
        assert first["id"] == second["id"]
        assert np.array_equal(first["images"][0], second["images"][0])
        assert not np.array_equal(first["images"][0], task[int(first["id"][-6:])]["images"][0])  # pixelated
    blocked = [json.loads(line) for line in (tmp_path / "blocked.jsonl").read_text().splitlines()]
    assert [b["position"] for b in blocked] == [2, 8]
    assert filtered.counts.seen == 12 and filtered.counts.passed == 10 and filtered.counts.blocked == 2


# ------------------------------------------------ the filter's own invariants (the worker is not under test)

class ScriptedClient:
    """Stands in for the worker: answers each check from a word in the sample's text, at once. The filter
    is what these tests are about; the real worker's verdicts are tested against the real checker above."""

    hello = staticmethod(lambda: {"instance_id": "scripted", "models": {}, "versions": {}})

    def __init__(self):
        self.submitted = 0

    def submit_sample(self, text, frames):
        self.submitted += 1
        if "SENDFAILS" in text:
            raise ConnectionError("scripted: the client could not send")
        future = Future()
        if "BLOCKME" in text:
            future.set_result(Verdict.blocked("scripted: blocked", "text"))
        elif "GUARDFAULT" in text:
            future.set_result(Verdict.blocked("scripted: the guard raised", "text", fault=True))
        elif "ERRORREPLY" in text:
            future.set_exception(WorkerError("internal", "scripted"))
        elif "NOFRAMES" in text:
            future.set_result(Verdict.passed(None))
        else:
            future.set_result(Verdict.passed(255 - frames))  # "sanitized": every pixel differs
        return future


KINDS = ["good", "BLOCKME", "GUARDFAULT", "ERRORREPLY", "NOFRAMES", "SENDFAILS", "bad-data", "no-images", "two-sizes"]


def scripted_samples(count: int, seed: int = 0) -> list:
    """``count`` samples of every kind above, in a seeded order; a ``BadSample`` for the data the loader refused."""
    rng = np.random.default_rng(seed)
    samples = []
    for position, kind in enumerate(rng.choice(KINDS, size=count)):
        if kind == "bad-data":
            samples.append(BadSample("scripted: cannot decode image", f"s{position}"))
            continue
        frames = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(int(rng.integers(1, 4)))]
        if kind == "no-images":
            frames = []
        elif kind == "two-sizes":  # sent as two videos: safe only if both are
            frames = [frames[0], rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)]
        samples.append({"id": f"s{position}", "images": frames,
                        "messages": [{"role": "user", "content": [{"type": "text", "text": f"What is it? {kind}"}]}]})
    return samples


def read_ledger(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("window", [1, 3, 16])
def test_every_sample_taken_is_trained_blocked_or_an_error_exactly_once(tmp_path, window):
    """``seen == passed + blocked + errors`` after every take, whatever the mix, and each count is its ledger:
    every position read is handed on, in blocked.jsonl or in errors.jsonl, exactly once, in order."""
    samples = scripted_samples(60)
    filtered = SafetyFilter(ScriptedClient(), enumerate(samples), window=window, output_dir=tmp_path)
    handed_on = []
    for position, sample in filtered:
        handed_on.append(position)
        c = filtered.counts
        assert c.seen == c.passed + c.blocked + c.errors and c.passed == len(handed_on)
        assert all((image != original).all() for image, original in zip(sample["images"], samples[position]["images"]))
    filtered.close()
    c = filtered.counts
    blocked, errors = read_ledger(tmp_path / "blocked.jsonl"), read_ledger(tmp_path / "errors.jsonl")
    assert (c.seen, c.passed, c.blocked, c.errors) == (60, len(handed_on), len(blocked), len(errors))
    assert c.data_errors == sum(e["kind"] == "data" for e in errors) == sum(isinstance(s, BadSample) for s in samples)
    decided = sorted(handed_on + [r["position"] for r in blocked + errors])
    assert decided == list(range(60))
    text = {p: sample_text(s) for p, s in enumerate(samples) if not isinstance(s, BadSample)}
    assert set(handed_on) == {p for p, t in text.items() if t.endswith(("good", "two-sizes"))}
    # A guard fault fails closed as a blocked verdict; a pass that came back without frames is an error.
    assert {r["position"] for r in blocked} == {p for p, t in text.items() if t.endswith(("BLOCKME", "GUARDFAULT"))}


@pytest.mark.parametrize("checkpoint_at", [0, 6, 11])
def test_a_filter_resumed_from_its_state_continues_exactly_like_the_uninterrupted_one(tmp_path, checkpoint_at):
    """What a checkpoint keeps of the filter (position, counters, ledger sizes) is all it needs: resumed from
    it after the first run went on past the checkpoint (ledger lines written, checks in flight), the filter
    hands on the same samples and frames, ends with the same counters and leaves byte-identical ledgers."""
    samples = scripted_samples(80, seed=1)
    (tmp_path / "whole").mkdir(), (tmp_path / "parts").mkdir()

    def stream_from(position):
        return ((p, samples[p]) for p in range(position, len(samples)))

    whole = SafetyFilter(ScriptedClient(), stream_from(0), window=4, output_dir=tmp_path / "whole")
    expected = list(whole)
    whole.close()

    first = SafetyFilter(ScriptedClient(), stream_from(0), window=4, output_dir=tmp_path / "parts")
    taken = [next(first) for _ in range(checkpoint_at)]
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint's JSON stores it
    for _ in range(5):  # the run goes on, then crashes before its next checkpoint
        next(first)
    first.close()
    resumed = SafetyFilter(ScriptedClient(), stream_from(state["next_position"]), window=4,
                           output_dir=tmp_path / "parts", state=state)
    rest = list(resumed)
    resumed.close()

    got = taken + rest
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert all(np.array_equal(a, b) for (_, x), (_, y) in zip(got, expected) for a, b in zip(x["images"], y["images"]))
    counted = ("seen", "passed", "blocked", "errors", "data_errors")  # not wait_seconds: a measured time
    assert [getattr(resumed.counts, k) for k in counted] == [getattr(whole.counts, k) for k in counted]
    for ledger in ("blocked.jsonl", "errors.jsonl"):
        assert (tmp_path / "parts" / ledger).read_bytes() == (tmp_path / "whole" / ledger).read_bytes(), ledger
