"""Fuzz a live worker with hostile messages: every one is answered (or, over the size cap, the peer is
disconnected), the worker never dies, and a good request still works afterwards.

CI runs 2,000 messages; `pytest -m slow` runs the full 10,000 (about 15 s here).
"""
import time

import msgpack
import numpy as np
import pytest
import zmq

from safety_worker import SafetyClient
from safety_worker import protocol as P
from safety_worker.tiny import BLOCKED_PHRASE

SIZE_CAP = 1 << 20  # the fuzzed worker's --max-message-bytes


@pytest.fixture(scope="module")
def fuzz_worker(spawn_tiny_worker):
    worker = spawn_tiny_worker("none", "--max-message-bytes", str(SIZE_CAP), "--queue-size", "8")
    yield worker
    worker.stop()


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _header(rng, **over):
    h = {"id": int(rng.integers(0, 2**31)), "op": "check_text", "args": {"texts": ["x"]}, "arrays": []}
    h.update(over)
    return msgpack.packb(h, use_bin_type=True)


def hostile(rng: np.random.Generator) -> tuple[str, list[bytes]]:
    """One malformed or hostile message (kind, frames); every kind stays under the size cap."""
    kind = int(rng.integers(0, 16))
    rb = lambda n: rng.bytes(int(n))  # noqa: E731
    tag = P.TAG
    if kind == 0:  # random frames
        return "random", [rb(rng.integers(0, 64)) for _ in range(int(rng.integers(1, 6)))]
    if kind == 1:  # a valid message cut short
        h = _header(rng)
        return "truncated", [tag, h[: int(rng.integers(0, len(h)))]]
    if kind == 2:  # wrong magic or wrong major version
        return "bad tag", [pick(rng, [b"SWKR\x02", b"SWKR\x00", b"SWK", b"XXXX\x01", b""]), _header(rng)]
    if kind == 3:  # header fields of the wrong types
        field = pick(rng, ["id", "op", "args", "arrays", "timeout_ms"])
        value = pick(rng, [None, -1, 2**70 // 2**7, 1.5, "s", [], {}, b"\x00", True])
        return "wrong type", [tag, _header(rng, **{field: value})]
    if kind == 4:  # huge or impossible shapes
        shape = pick(rng, [[2**40, 2**20, 3], [-1, 4, 4, 3], [10**6, 4096, 4096, 3], [1, 0, 0, 3], [1] * 40])
        h = _header(rng, op="check_video", args={}, arrays=[{"dtype": "uint8", "shape": list(shape)}])
        return "huge shape", [tag, h, rb(rng.integers(0, 256))]
    if kind == 5:  # dtypes that must not travel
        dt = pick(rng, ["object", "<U10", "float128", "complex64", "V8", "", "uint8;rm -rf"])
        return "bad dtype", [tag, _header(rng, op="check_video", args={}, arrays=[{"dtype": dt, "shape": [1, 2, 2, 3]}]), rb(12)]
    if kind == 6:  # buffer length disagrees with shape
        h = _header(rng, op="check_video", args={}, arrays=[{"dtype": "uint8", "shape": [1, 8, 8, 3]}])
        return "short buffer", [tag, h, rb(rng.integers(0, 191))]
    if kind == 7:  # more or fewer array frames than declared
        h = _header(rng, op="echo", args={}, arrays=[{"dtype": "uint8", "shape": [4]}])
        return "frame count", [tag, h] + [rb(4)] * int(pick(rng, [0, 2, 3]))
    if kind == 8:  # unknown op / extra keys / extra args
        return "unknown op", [tag, _header(rng, op=rb(8).hex(), extra=1)]
    if kind == 9:  # deep nesting (msgpack StackError) or huge container counts
        deep = b"\x91" * 5000 + b"\xc0"
        many = b"\xdd\xff\xff\xff\xff"  # array32 claiming 4 billion elements
        return "nesting", [tag, deep if rng.random() < 0.5 else many]
    if kind == 10:  # text args that are not text, too many, too long
        texts = pick(rng, [[1, 2], "not a list", [None], ["a"] * 1000, ["x" * 40_000], [b"bytes"]])
        return "bad texts", [tag, _header(rng, args={"texts": texts})]
    if kind == 11:  # msgpack ext types and non-string map keys
        return "ext", [tag, b"\x81\xd4\x01\x02\xc0" if rng.random() < 0.5 else b"\x81\x01\x02"]
    if kind == 12:  # a leading empty frame (REQ-style delimiter) before garbage
        return "delimiter", [b"", rb(rng.integers(0, 32))]
    if kind == 13:  # shutdown with a guessed token
        return "shutdown guess", [tag, _header(rng, op="shutdown", args={"token": rb(16).hex()})]
    if kind == 14:  # non-uint8 or wrong-rank frames for a check
        a = rng.integers(0, 255, (2, 8, 8), dtype=np.int16)
        h = _header(rng, op="check_sample", args={"text": "hi"}, arrays=[{"dtype": "int16", "shape": [2, 8, 8]}])
        return "wrong frames", [tag, h, a.tobytes()]
    # kind 15: valid requests mixed in (they must still be answered correctly)
    op = pick(rng, ["ping", "stats", "echo", "check_text"])
    arrays = [rng.integers(0, 255, 16, dtype=np.uint8)] if op == "echo" else []
    args = {"texts": [BLOCKED_PHRASE]} if op == "check_text" else {}
    return "valid", P.encode_request(P.Request(id=int(rng.integers(0, 2**31)), op=op, args=args, arrays=arrays))


# The error codes each kind of hostile message may be answered with. A "wrong type" can still make a valid
# request (an empty `arrays` list, a large but valid id), so it may also be answered ok; no other kind may.
EXPECTED_CODES = {
    "random": {P.BAD_MESSAGE, P.UNSUPPORTED_VERSION}, "truncated": {P.BAD_MESSAGE},
    "bad tag": {P.BAD_MESSAGE, P.UNSUPPORTED_VERSION}, "wrong type": {P.BAD_MESSAGE, P.BAD_ARGS, P.UNKNOWN_OP, None},
    "huge shape": {P.BAD_ARRAY, P.TOO_LARGE}, "bad dtype": {P.BAD_ARRAY}, "short buffer": {P.BAD_ARRAY},
    "frame count": {P.BAD_ARRAY}, "unknown op": {P.BAD_MESSAGE, P.UNKNOWN_OP}, "nesting": {P.BAD_MESSAGE},
    "bad texts": {P.BAD_ARGS, P.TOO_LARGE}, "ext": {P.BAD_MESSAGE}, "delimiter": {P.BAD_MESSAGE},
    "shutdown guess": {P.FORBIDDEN}, "wrong frames": {P.BAD_ARRAY}, "valid": {None},
}


def run_fuzz(worker, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker.endpoint)
    kinds: dict[str, int] = {}
    try:
        for i in range(n):
            kind, frames = hostile(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            sock.send_multipart(frames)
            # Lock-step: the reply to this message must come before the next is sent.
            assert sock.poll(15_000), f"message {i} ({kind}) got no reply: {[bytes(f[:32]) for f in frames]}"
            reply = sock.recv_multipart()
            body = reply[1:] if reply and reply[0] == b"" else reply
            decoded = P.decode_reply(body)
            code = decoded.error["code"] if decoded.status == P.STATUS_ERROR else None  # None: answered ok
            assert code in EXPECTED_CODES[kind], (i, kind, decoded.error)
            if i % 500 == 0:
                assert worker.proc.poll() is None, f"worker died at message {i} ({kind})"
        # Over the size cap: the peer is disconnected (no reply), the worker lives on.
        for _ in range(5):
            big = ctx.socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(worker.endpoint)
            big.send_multipart([P.TAG, _header(rng), b"\x00" * (SIZE_CAP + 1)])
            assert big.poll(300) == 0
            big.close()
            kinds["over size cap"] = kinds.get("over size cap", 0) + 1
    finally:
        sock.close()
        ctx.term()
    assert worker.proc.poll() is None
    with SafetyClient(worker.endpoint, timeout=30) as c:
        assert c.check_text(BLOCKED_PHRASE).safe is False
        stats = c.stats()
    return {"kinds": kinds, "stats": stats}


def test_fuzz_short(fuzz_worker):
    pid = fuzz_worker.pid
    start = time.perf_counter()
    result = run_fuzz(fuzz_worker, 2_000)
    print(f"\n2,000 hostile messages + 5 over the cap in {time.perf_counter() - start:.1f}s: {result['kinds']}")
    assert len(result["kinds"]) >= 15
    assert fuzz_worker.pid == pid  # not restarted: it never died


@pytest.mark.slow
def test_fuzz_10000_hostile_messages(fuzz_worker):
    pid = fuzz_worker.pid
    start = time.perf_counter()
    result = run_fuzz(fuzz_worker, 10_000, seed=1)
    print(f"\n10,000 hostile messages + 5 over the cap in {time.perf_counter() - start:.1f}s: {result['kinds']}")
    assert sum(result["kinds"].values()) >= 10_005
    assert fuzz_worker.pid == pid
