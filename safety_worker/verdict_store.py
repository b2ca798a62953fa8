"""One verdict store on disk that every worker, replica front, `curate` job and experiment shares.

Content-addressed: the key is `proxy.content_key` (SHA-256 over the checker identity, the op, its
arguments and the arrays' dtypes, shapes and bytes), the value the reply's result map and its arrays
(the sanitized frames). The same content checked by the same checker is never checked again, in this
run or any other; a different checker (models, policy, versions) has different keys, so its verdicts
are never mixed in. Verdicts that came from a fault (`Verdict.fault`: timeout, guard error, unlabeled
answer) say nothing about the content and are refused by `put`.

Why SQLite in WAL mode rather than LMDB: it ships with Python (no dependency), WAL lets readers run
while one writer commits and serialises writers from several *processes* on one file with a busy
timeout (every Ray actor and worker opens its own connection), and a transaction is atomic: a writer
killed with SIGKILL mid-write leaves the last committed state, recovered from the WAL on the next open
(LMDB is as crash-safe but maps a fixed-size file, needs its map size chosen up front and a wrapper
package, and its single-writer lock is no better here). `synchronous=NORMAL`: in WAL mode a commit
survives the process being killed (the OS holds the written WAL); only a power loss can roll back the
last commits, and never corrupts the file. The file lives on a local or shared POSIX disk (not NFS:
SQLite's locks need a real file system).

Bounded: `max_bytes` over the stored entries (arrays plus a fixed overhead per entry); when a `put`
passes it, the least recently used entries are evicted in the same transaction (LRU by `last_used`,
updated on every hit).

The file holds verdicts a trainer will act on, so like `--cache-file` it must be the user's own and
not writable by others (a planted "safe" entry would be a forged verdict): created 0600, refused
otherwise with the command that fixes it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

import msgpack
import numpy as np

from .protocol import Verdict

ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its arrays (key, result map, row): as VerdictCache
_BUSY_TIMEOUT_S = 60.0  # writers from other processes hold the lock for one short transaction each

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    result BLOB NOT NULL,
    arrays BLOB NOT NULL,
    size INTEGER NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_last_used ON verdicts(last_used);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
-- The running total is kept by triggers inside each writer's transaction, so it can never drift
-- from the rows (a writer killed mid-transaction rolls both back).
CREATE TRIGGER IF NOT EXISTS verdicts_added AFTER INSERT ON verdicts
    BEGIN UPDATE totals SET bytes = bytes + new.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS verdicts_removed AFTER DELETE ON verdicts
    BEGIN UPDATE totals SET bytes = bytes - old.size WHERE id = 0; END;
"""


class VerdictStoreError(RuntimeError):
    """The store file cannot be used (not ours, writable by others, not a verdict store)."""


def is_fault_result(result: dict) -> bool:
    """Whether a reply's result holds a fault verdict (one verdict, or `verdicts` of a check_text)."""
    return any(Verdict.from_wire(v).fault for v in result.get("verdicts", [result]))


class VerdictStore:
    """The verdicts of `path` (an SQLite file, created if missing); see the module docstring.

    Same interface as `proxy.VerdictCache` (`get`, `put`, `snapshot`), so either can sit where a
    check's verdict is reused. Thread-safe (one connection behind a lock); each process opens its own."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 10 << 30):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.refused_faults = self.evicted = 0
        self._lock = threading.Lock()
        self._check_file()
        self._db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                # Every statement is idempotent (IF NOT EXISTS, OR IGNORE): processes may open a new file at once.
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                # Two processes opening a new file at once: switching it to WAL can fail with "database is
                # locked" at once, without SQLite's busy handler (seen in tests/test_verdict_store.py, 1 run
                # in 4): the other process is setting it up, so wait and try again.
                if "locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._db.close()
                raise VerdictStoreError(f"{self.path} is not a verdict store ({e}); give --verdict-store a new path") from None
            except sqlite3.DatabaseError as e:
                self._db.close()
                raise VerdictStoreError(f"{self.path} is not a verdict store ({e}); give --verdict-store a new path") from None

    def _check_file(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                return
            except FileExistsError:
                pass  # another process (a second worker, an actor) created it between our two calls: check theirs
        st = self.path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise VerdictStoreError(f"verdict store {self.path} must be yours and writable by you alone "
                                    f"(a planted entry would be a forged 'safe' verdict): `chmod 600 {self.path}` "
                                    "or use another path")

    def _transaction(self):
        return _Transaction(self._db)

    # -- the VerdictCache interface

    def get(self, key: str) -> tuple[dict, list[np.ndarray]] | None:
        """`(result, arrays)` stored for `key`, or None; a hit makes the entry the most recently used."""
        with self._lock:
            row = self._db.execute("SELECT result, arrays FROM verdicts WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            self._db.execute("UPDATE verdicts SET last_used = ? WHERE key = ?", (time.time(), key))
        return _unpack_result(row[0]), _unpack_arrays(row[1])

    def put(self, key: str, result: dict, arrays: Sequence[np.ndarray]) -> bool:
        """Store a verdict (False, nothing stored: a fault, or bigger than the whole store)."""
        if is_fault_result(result):
            self.refused_faults += 1
            return False
        packed = _pack_arrays(arrays)
        size = len(packed) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        with self._lock, self._transaction():
            # Content-addressed: an entry already there holds the same verdict (another writer won).
            self._db.execute("INSERT OR IGNORE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                             (key, msgpack.packb(result, use_bin_type=True), packed, size, time.time()))
            self._evict()
        return True

    def _evict(self) -> None:
        """Drop least recently used entries until the total fits (inside the caller's transaction)."""
        (total,) = self._db.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        while total > self.max_bytes:
            rows = self._db.execute("SELECT key, size FROM verdicts ORDER BY last_used LIMIT 64").fetchall()
            if not rows:
                return
            for key, size in rows:
                if total <= self.max_bytes:
                    break
                self._db.execute("DELETE FROM verdicts WHERE key = ?", (key,))
                total -= size
                self.evicted += 1

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM verdicts WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0]

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0]

    def snapshot(self) -> dict:
        return {"path": str(self.path), "entries": len(self), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evicted": self.evicted,
                "refused_faults": self.refused_faults}

    def integrity_check(self) -> str:
        """SQLite's own `PRAGMA integrity_check` ("ok" when the file is sound)."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "VerdictStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken up front, so two
    processes never both read then fail to upgrade (SQLITE_BUSY without waiting)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _pack_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    # msgpack (no code on load), as VerdictCache.save writes its entries.
    return msgpack.packb([[a.dtype.name, list(a.shape), np.ascontiguousarray(a).tobytes()] for a in arrays],
                         use_bin_type=True)


def _unpack_arrays(blob: bytes) -> list[np.ndarray]:
    return [np.frombuffer(buf, dtype=np.dtype(dt)).reshape(shape)
            for dt, shape, buf in msgpack.unpackb(blob, raw=False)]


def _unpack_result(blob: bytes) -> dict:
    return msgpack.unpackb(blob, raw=False, strict_map_key=True)
