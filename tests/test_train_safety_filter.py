"""The safety filter in the training data path, against real tiny workers."""
import json

import numpy as np
import pytest

from safety_worker import SafetyClient
from theworld.data.safety_filter import SafetyCheckFailed, SafetyFilter
from theworld.data.sources import SampleStream
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
        for _ in range(20):
            next(filtered)
        filtered.close()
    assert 1 < counter.max_outstanding <= 5
    assert filtered.counts.wait_seconds > 0 and filtered.counts.passed == 20


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
