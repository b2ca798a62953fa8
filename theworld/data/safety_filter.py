"""The safety worker in the data path: checks run ahead of the trainer, blocked samples are ledgered.

``SafetyFilter`` keeps a bounded window of ``SafetyClient.submit_sample`` requests in flight ahead of
the sample the trainer is about to take, so the trainer waits only when the worker is slower than a
training step. Each sample's whole text is checked and its images go through the face filter; a safe
sample is handed on with its images *replaced by the sanitized frames* the worker returned, so the
model never sees unchecked pixels. A blocked sample is written to ``blocked.jsonl`` (id and reason),
a failed check (worker error, timeout) to ``errors.jsonl`` with ``"kind": "safety"``; failed checks are
never trained on (fail closed). A sample the data path could not load (``theworld.data.sources.BadSample``:
a missing or undecodable file, a malformed sample) is ledgered there too, with ``"kind": "data"``, and
never sent. Nothing is dropped silently: ``seen == passed + blocked + errors``.

A sample whose content (text and frames) was already checked in this run is not sent again: with
``reuse_mb`` the filter keeps the verdicts it got, sanitized frames included, keyed by the checker's
identity and the content (``safety_worker.proxy.VerdictCache``, the cache the worker's proxy uses). Every
epoch over a fixed dataset after the first then costs the worker nothing; the checker is deterministic,
and a verdict that came from a fault (timeout, guard error) is never reused.

Data written by ``python -m safety_worker curate`` (``curated=True``) was checked once, by the same
checker (the trainer verifies the manifest's checker identity against its worker): its frames are the
sanitized ones already, so its samples are passed on without a check, and only a sample that cannot be
loaded is ledgered. The counts and ledgers keep their meaning.

Counters and the reading position describe samples the trainer has *taken*, not the ones in flight,
so a checkpoint made between two takes can resume exactly (in-flight checks are simply redone).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from safety_worker import Verdict
from safety_worker.proxy import VerdictCache, checker_identity, content_key
from theworld.data.sources import BadSample, sample_text

# A fractional --max-bad-samples is judged against the samples read so far; the first few bad samples
# are always allowed, so that one bad file among the first samples read does not stop a run.
MIN_BAD_SAMPLES_ALLOWED = 10


class SafetyCheckFailed(RuntimeError):
    """Too many samples could not be checked: the worker is gone, overloaded or rejects the input."""


class TooManyBadSamples(RuntimeError):
    """More samples than ``--max-bad-samples`` allows could not be loaded (see the errors ledger)."""


@dataclass(frozen=True)
class BadSampleLimit:
    """``--max-bad-samples``: a count ``N``, or ``P%`` of the samples read so far (at least
    ``MIN_BAD_SAMPLES_ALLOWED`` bad samples are then allowed)."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, spec: str | int | float) -> "BadSampleLimit":
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                fraction = float(text[:-1]) / 100
                if not 0 <= fraction <= 1:
                    raise ValueError
                return cls(fraction=fraction)
            count = int(text)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(f"--max-bad-samples must be a count (e.g. 100) or a percentage (e.g. 1%), got {spec!r}") from None

    def allowed(self, seen: int) -> float:
        if self.count is not None:
            return self.count
        return max(MIN_BAD_SAMPLES_ALLOWED, self.fraction * seen)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction * 100:g}%"


@dataclass
class FilterCounts:
    seen: int = 0  # taken off the stream and decided
    passed: int = 0  # safe: handed to the trainer with sanitized images
    blocked: int = 0  # the guard said no: in blocked.jsonl
    errors: int = 0  # the check failed or the sample could not be loaded: in errors.jsonl, not trained on
    data_errors: int = 0  # of those, the samples the data path could not load ("kind": "data")
    wait_seconds: float = 0.0  # time the trainer sat waiting for a verdict

    @property
    def safety_errors(self) -> int:
        """Samples whose safety check failed (the errors that count toward ``max_errors``)."""
        return self.errors - self.data_errors


@dataclass
class _Pending:
    position: int
    sample: dict
    futures: list[Future]
    error: str | None = None
    kind: str = "safety"  # what failed when error is set: "safety" (the check) or "data" (loading the sample)
    keys: list[str | None] | None = None  # content key per video, for reusing their verdicts


def _done(verdict: Verdict) -> Future:
    future: Future = Future()
    future.set_result(verdict)
    return future


def _frame_groups(images: list[np.ndarray]) -> list[np.ndarray]:
    """Images as ``[T,H,W,3]`` videos for the worker: one video when all share a size, else one per image."""
    if images and all(image.shape == images[0].shape for image in images):
        return [np.stack(images)]
    return [image[None] for image in images]


class SafetyFilter:
    """Iterate ``(position, sanitized_sample)`` over the safe samples of ``stream``.

    Args:
        client: a connected ``safety_worker.SafetyClient``.
        stream: an iterator of ``(position, sample)``, a sample possibly a ``BadSample``
            (``theworld.data.prefetch.Prefetcher``).
        window: how many checks to keep in flight ahead of the trainer.
        output_dir: where ``blocked.jsonl`` and ``errors.jsonl`` are appended.
        ledger_suffix: added to the ledger names (distinct files per rank).
        max_errors: raise ``SafetyCheckFailed`` once more checks than this have failed (bad samples
            do not count).
        max_bad_samples: raise ``TooManyBadSamples`` past this many bad samples (a ``BadSampleLimit``;
            default: no limit).
        result_timeout: seconds to wait for one verdict before counting it as an error.
        state: a ``state_dict()`` from an earlier run to continue from (ledgers are cut back to it).
        fresh_ledgers: start the ledgers empty instead of appending (for a pass that is redone every run).
        reuse_mb: memory (MiB) for the verdicts of content already checked, reused instead of checking it
            again (0: every sample is sent).
        worker_hello: the worker's ``hello`` answer, naming the checker whose verdicts are reused (asked
            for when not given).
        curated: the stream is a curate output whose manifest covers every sample: pass samples on
            unchecked (see the module docstring).
    """

    def __init__(self, client, stream: Iterator[tuple[int, dict]], window: int = 16, output_dir=".",
                 ledger_suffix: str = "", max_errors: int = 50, result_timeout: float = 120.0, state: dict | None = None,
                 fresh_ledgers: bool = False, max_bad_samples: BadSampleLimit | None = None, reuse_mb: float = 0,
                 worker_hello: dict | None = None, curated: bool = False):
        if window < 1:
            raise ValueError(f"safety_window must be at least 1, got {window}")
        self.client, self.stream, self.window = client, stream, window
        self.max_errors, self.result_timeout = max_errors, result_timeout
        self.max_bad_samples = max_bad_samples
        self.curated = curated
        self.blocked_path = Path(output_dir) / f"blocked{ledger_suffix}.jsonl"
        self.errors_path = Path(output_dir) / f"errors{ledger_suffix}.jsonl"
        self.counts = FilterCounts()
        self.next_position = 0
        if state is not None:
            self.counts = FilterCounts(**state["counts"])
            self.next_position = state["next_position"]
            for path, size in ((self.blocked_path, state["blocked_bytes"]), (self.errors_path, state["errors_bytes"])):
                # Entries after the checkpoint are rewritten when the resumed run re-decides those samples.
                if path.exists():
                    os.truncate(path, size)
        self._pending: deque[_Pending] = deque()
        self.reused = VerdictCache(int(reuse_mb * 2**20)) if reuse_mb > 0 else None
        self._in_flight: dict[str, Future] = {}  # checks sent and not yet reused or remembered, by content key
        self._checker = checker_identity(worker_hello or client.hello()) if self.reused is not None else None
        mode = "w" if fresh_ledgers else "a"
        self._blocked_file = open(self.blocked_path, mode, encoding="utf-8")
        self._errors_file = open(self.errors_path, mode, encoding="utf-8")

    # The trainer takes samples one at a time; each take tops the window up first.
    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict]:
        while True:
            self._fill()
            if not self._pending:
                raise StopIteration  # a finite stream (the held-out set) is exhausted
            item = self._pending.popleft()
            verdict, images, error = self._wait(item)
            self.counts.seen += 1
            self.next_position = item.position + 1
            if error is not None:
                self._record_error(item, error)
                continue
            if not verdict.safe:
                self.counts.blocked += 1
                self._write(self._blocked_file, {"id": item.sample["id"], "position": item.position, "reason": verdict.reason, "stage": verdict.stage})
                continue
            self.counts.passed += 1
            sample = dict(item.sample)
            sample["images"] = images
            return item.position, sample

    def _fill(self):
        while len(self._pending) < self.window:
            try:
                position, sample = next(self.stream)
            except StopIteration:
                return
            self._pending.append(self._submit(position, sample))

    def _submit(self, position: int, sample: dict | BadSample) -> _Pending:
        if isinstance(sample, BadSample):
            sample_id = sample.sample_id if sample.sample_id is not None else f"position-{position}"
            return _Pending(position, {"id": sample_id}, [], error=sample.reason, kind="data")
        try:
            text = sample_text(sample)
            groups = _frame_groups([np.ascontiguousarray(image, dtype=np.uint8) for image in sample["images"]])
            if not groups:
                raise ValueError("the sample has no images")
            if self.curated:  # checked and sanitized by curate, by this worker's checker: nothing to send
                return _Pending(position, sample, [_done(Verdict.passed(frames)) for frames in groups])
            keys = [self._key(text, frames) for frames in groups]
            futures = [self._reused(key) or self._send(key, text, frames) for key, frames in zip(keys, groups)]
        except Exception as e:  # a malformed sample or a closed client: fail closed, keep going
            return _Pending(position, sample, [], error=f"{type(e).__name__}: {e}")
        return _Pending(position, sample, futures, keys=keys)

    def _key(self, text: str, frames: np.ndarray) -> str | None:
        return content_key(self._checker, "check_sample", {"text": text}, [frames]) if self.reused is not None else None

    def _send(self, key: str | None, text: str, frames: np.ndarray) -> Future:
        future = self.client.submit_sample(text, frames)
        if key is not None:
            self._in_flight[key] = future
        return future

    def _reused(self, key: str | None) -> Future | None:
        """A verdict for content already checked, or the check of the same content still in flight (a
        dataset smaller than the window meets a sample again before its first check is back)."""
        if key is None:
            return None
        cached = self.reused.get(key)
        if cached is None:
            return self._in_flight.get(key)
        result, arrays = cached
        return _done(Verdict.from_wire(result, arrays[0] if arrays else None))

    def _remember(self, keys: list[str | None], verdicts: list[Verdict]) -> None:
        for key, verdict in zip(keys, verdicts):
            if key is not None:
                self._in_flight.pop(key, None)
            if key is not None and not verdict.fault:
                self.reused.put(key, verdict.to_wire(), [] if verdict.frames is None else [verdict.frames])

    def _wait(self, item: _Pending) -> tuple[Verdict | None, list[np.ndarray] | None, str | None]:
        """``(verdict, sanitized images, None)`` when safe, ``(blocked verdict, None, None)`` or
        ``(None, None, error)`` when the check failed. A sample sent as several videos is safe only if
        all are (the first blocked one is its verdict).

        Only the time spent blocked here counts as the trainer waiting on the worker."""
        if item.error is not None:
            return None, None, item.error
        start = time.perf_counter()
        try:
            verdicts: list[Verdict] = [future.result(timeout=self.result_timeout) for future in item.futures]
        except Exception as e:
            for key in item.keys or ():
                self._in_flight.pop(key, None)  # a failed check is sent again when its content comes back
            return None, None, f"{type(e).__name__}: {e}"
        finally:
            self.counts.wait_seconds += time.perf_counter() - start
        if item.keys:
            self._remember(item.keys, verdicts)
        for verdict in verdicts:
            if not verdict.safe:
                return verdict, None, None
            if verdict.frames is None:
                return None, None, "the worker passed the sample but returned no sanitized frames"
        images = [np.asarray(frame) for verdict in verdicts for frame in verdict.frames]
        if len(images) != len(item.sample["images"]):
            return None, None, f"the worker returned {len(images)} frames for {len(item.sample['images'])} images"
        return verdicts[0], images, None

    def _record_error(self, item: _Pending, error: str):
        kind = item.kind
        self.counts.errors += 1
        self.counts.data_errors += kind == "data"
        self._write(self._errors_file, {"id": item.sample["id"], "position": item.position, "kind": kind, "error": error})
        if kind == "data":
            if self.max_bad_samples is not None and self.counts.data_errors > self.max_bad_samples.allowed(self.counts.seen):
                raise TooManyBadSamples(
                    f"{self.counts.data_errors} of {self.counts.seen} samples read could not be loaded, more than "
                    f"--max-bad-samples {self.max_bad_samples} allows (last: {item.sample['id']}: {error}). See "
                    f"{self.errors_path} for every bad sample; fix the data or raise --max-bad-samples."
                )
            return
        if self.counts.safety_errors > self.max_errors:
            raise SafetyCheckFailed(
                f"{self.counts.safety_errors} samples failed their safety check (last: {error}). Is the safety worker "
                f"alive and reachable? See {self.errors_path}; raise safety_max_errors to tolerate more."
            )

    @staticmethod
    def _write(file, record: dict):
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()

    def state_dict(self) -> dict:
        """Position and counters of the samples taken so far (not of the checks still in flight)."""
        return {
            "next_position": self.next_position,
            "counts": asdict(self.counts),
            "blocked_bytes": os.fstat(self._blocked_file.fileno()).st_size,
            "errors_bytes": os.fstat(self._errors_file.fileno()).st_size,
        }

    def close(self):
        """Forget the checks still in flight (they were never seen) and close the ledgers.

        Their futures are left to complete and be discarded, not cancelled: the requests are already
        with the worker, and the client resolves every future it issued (cancelling one under it would
        make it set a result on a cancelled future)."""
        self._pending.clear()
        self._blocked_file.close()
        self._errors_file.close()
