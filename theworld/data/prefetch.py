"""Reading and decoding run ahead of the trainer, in threads, in order, bounded.

``Prefetcher`` takes a stream of ``(position, load)`` (``SampleStream.iter_loads_from``,
``ShardStream.iter_loads_from``): a reader thread walks the stream (for shards this is where the
files are read) and hands each ``load`` to a pool of decoding threads; the trainer's thread takes the
results in stream order. At most ``depth`` samples are read ahead, so memory stays bounded however
long the stream is.

Threads, not processes: the work is file I/O, PIL's and ffmpeg's decoders and numpy, which release
the GIL (ffmpeg runs in its own process); a decoded clip stays in this process instead of being
pickled across a pipe; and the safety filter that consumes the samples lives here too.

A sample whose ``load`` raises comes out as a ``BadSample`` in its place (the trainer ledgers it and
reads on); the order and the positions never change, so a resumed run that restarts the stream at the
saved position reads exactly what the uninterrupted run read. Samples read ahead but not taken when
a checkpoint is written are simply read again after ``--resume``.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from theworld.data.sources import BadSample

_END = object()


def load_or_bad(load: Callable[[], dict]) -> dict | BadSample:
    """The sample, or the ``BadSample`` that says why it cannot be used (unexpected errors included:
    a decoder can fail in ways nobody listed, and one bad file must not stop a run)."""
    try:
        return load()
    except BadSample as e:
        return e
    except Exception as e:
        return BadSample(f"cannot load the sample: {type(e).__name__}: {e}")


class _ReaderFailed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate ``(position, sample or BadSample)`` over ``loads``, decoded ahead by ``workers`` threads.

    Args:
        loads: an iterator of ``(position, load)``.
        workers: decoding threads; 0 reads and decodes on the caller's thread (no read-ahead).
        depth: samples read ahead at most (default ``4 * workers``).

    ``wait_seconds`` is the time the caller sat waiting for a sample: the data path's share of the
    trainer's time.
    """

    def __init__(self, loads: Iterator[tuple[int, Callable[[], dict]]], workers: int = 2, depth: int | None = None):
        if workers < 0:
            raise ValueError(f"data_workers must be 0 or more, got {workers}")
        self.loads, self.workers = loads, workers
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._pool = self._reader = None
        if workers:
            self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth or 4 * workers))
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="theworld-decode")
            self._reader = threading.Thread(target=self._read, name="theworld-read", daemon=True)
            self._reader.start()

    def _read(self):
        try:
            for position, load in self.loads:
                if not self._put((position, self._pool.submit(load_or_bad, load))):
                    return
        except BaseException as e:  # a shard that cannot be opened, a broken stream: the caller raises it
            self._put(_ReaderFailed(e))
        else:
            self._put(_END)

    def _put(self, item) -> bool:
        """Block while the queue is full; False once closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict | BadSample]:
        start = time.perf_counter()
        try:
            if not self.workers:
                position, load = next(self.loads)
                return position, load_or_bad(load)
            item = self._queue.get()
            if item is _END:
                self._queue.put(_END)  # later calls end too
                raise StopIteration
            if isinstance(item, _ReaderFailed):
                self._queue.put(item)
                raise item.error
            position, future = item
            return position, future.result()
        finally:
            self.wait_seconds += time.perf_counter() - start

    def close(self):
        """Stop reading ahead; what was read and not taken is dropped (it is re-read after a resume)."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            while True:  # unblock a reader waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._reader.join(timeout=5)
