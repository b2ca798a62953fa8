"""How the serving engine groups requests: the real `BatchingEngine` queue, wait and grouping rules, with its
model call replaced by a record of the groups (the batched `generate` itself, and that batched answers equal
one-at-a-time answers, are tested in test_serve.py and test_generate.py)."""
import threading
from concurrent.futures import wait

import pytest

from theworld.inference.engine import BatchingEngine, Generation, Job


class RecordingEngine(BatchingEngine):
    """Records each group it would generate; a group holding the sample "bad" fails, as a broken input would."""

    def __init__(self, model, **options):
        self.groups, self._lock = [], threading.Lock()
        super().__init__(model, **options)

    def _generate(self, group):
        with self._lock:
            self.groups.append([job.sample["id"] for job in group])
        if any(job.sample["id"] == "bad" for job in group):
            raise RuntimeError("scripted: this input breaks generate")
        return [Generation(answer=job.sample["id"], finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                           batch_size=len(group)) for job in group]


def job(sample_id, **settings):
    return Job(sample={"id": sample_id, "messages": [], "images": []}, max_tokens=4, **settings)


@pytest.fixture
def engine_for(tiny_world_model):
    engines = []

    def make(**options):
        engines.append(RecordingEngine(tiny_world_model, **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_jobs_that_arrive_together_are_grouped_by_their_generation_settings(engine_for):
    """Greedy jobs share one generate whatever their top_p; sampled jobs share one when temperature and top_p
    agree; a seeded sampled job runs alone (reproducible); a failing group is retried job by job, so only the
    bad job fails."""
    jobs = [job("g1"), job("g2", top_p=0.5), job("bad"), job("s1", temperature=0.7, top_p=0.9),
            job("s2", temperature=0.7, top_p=0.9), job("s3", temperature=0.7, top_p=0.5),
            job("seeded1", temperature=0.7, top_p=0.9, seed=1), job("seeded2", temperature=0.7, top_p=0.9, seed=1)]
    engine = engine_for(max_batch=len(jobs), batch_wait=5.0)  # starts as soon as all are in
    futures = [engine.submit(j) for j in jobs]
    wait(futures, timeout=30)
    assert engine.groups == [["g1", "g2", "bad"], ["g1"], ["g2"], ["bad"], ["s1", "s2"], ["s3"], ["seeded1"],
                             ["seeded2"]]
    answers = {j.sample["id"]: (f.exception() or f.result()) for j, f in zip(jobs, futures)}
    assert isinstance(answers.pop("bad"), RuntimeError)
    assert {name: (a.answer, a.batch_size) for name, a in answers.items()} == {
        "g1": ("g1", 1), "g2": ("g2", 1), "s1": ("s1", 2), "s2": ("s2", 2), "s3": ("s3", 1),
        "seeded1": ("seeded1", 1), "seeded2": ("seeded2", 1)}


def test_a_batch_holds_at_most_max_batch_jobs(engine_for):
    engine = engine_for(max_batch=3, batch_wait=0.5)
    futures = [engine.submit(job(f"g{i}")) for i in range(7)]
    wait(futures, timeout=30)
    assert [len(group) for group in engine.groups] == [3, 3, 1]
    assert [name for group in engine.groups for name in group] == [f"g{i}" for i in range(7)]
