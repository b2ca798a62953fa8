"""Wire protocol of the safety worker: framing, header schema, error codes, and validation.

A message is a ZeroMQ multipart message `[tag, header, buf0, buf1, ...]`:

- `tag`: `b"SWKR"` followed by one byte, the protocol's major version.
- `header`: one msgpack map (see docs/PROTOCOL.md for every field and op).
- `buf*`: raw C-contiguous array bytes, one frame per entry of the header's `arrays` list, sent
  and received without copying.

This module is the one place that encodes and decodes messages and validates requests; the
server and the client both use it. It imports numpy and msgpack only (no zmq, no torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

MAGIC = b"SWKR"
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1  # 1.1: hello.batching, hello.metrics_url, stats outcomes/verdicts_by_stage/batching/histograms
TAG = MAGIC + bytes([PROTOCOL_MAJOR])
# Not on the wire: how spawn_worker hands a worker its owner token (environment, not argv, which others can read).
OWNER_TOKEN_ENV = "SAFETY_WORKER_OWNER_TOKEN"

# Statuses and error codes (docs/PROTOCOL.md lists when each is sent).
STATUS_OK = "ok"
STATUS_ERROR = "error"
BAD_MESSAGE = "bad_message"  # framing, msgpack or header schema is wrong
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OP = "unknown_op"
BAD_ARGS = "bad_args"
BAD_ARRAY = "bad_array"
TOO_LARGE = "too_large"
BUSY = "busy"
DEADLINE_EXCEEDED = "deadline_exceeded"
SHUTTING_DOWN = "shutting_down"
FORBIDDEN = "forbidden"
INTERNAL = "internal"
ERROR_CODES = (
    BAD_MESSAGE, UNSUPPORTED_VERSION, UNKNOWN_OP, BAD_ARGS, BAD_ARRAY, TOO_LARGE, BUSY,
    DEADLINE_EXCEEDED, SHUTTING_DOWN, FORBIDDEN, INTERNAL,
)

# Ops: name -> (allowed args -> required?, min arrays, max arrays).
OPS: dict[str, tuple[dict[str, bool], int, int]] = {
    "hello": ({}, 0, 0),
    "ping": ({}, 0, 0),
    "stats": ({}, 0, 0),
    "echo": ({}, 0, 8),
    "check_text": ({"texts": True}, 0, 0),
    "check_video": ({}, 1, 1),
    "check_sample": ({"text": True}, 0, 1),
    "shutdown": ({"token": False}, 0, 0),  # no token: `forbidden`, like a wrong one
}
CHECK_OPS = frozenset({"check_text", "check_video", "check_sample"})

# Fixed-size little-endian dtypes that may travel (no objects, no platform-dependent sizes).
WIRE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool"})
MAX_RANK = 8
MAX_ID = 2**64 - 1
_MAX_CONTAINER_LEN = 65_536  # msgpack arrays/maps in a header: far above any valid request
_REQUEST_KEYS = {"id", "op", "args", "arrays", "timeout_ms"}
_REPLY_KEYS = {"id", "status", "result", "error", "arrays"}


@dataclass(frozen=True)
class Limits:
    """Sizes the worker accepts; reported by `hello` and enforced by `validate_*` below."""

    max_message_bytes: int = 256 * 2**20  # also the socket's MAXMSGSIZE (per frame)
    max_header_bytes: int = 1 * 2**20
    max_texts: int = 256
    max_text_chars: int = 32_768
    max_frames: int = 1024
    max_side: int = 4096
    max_video_bytes: int = 256 * 2**20
    queue_size: int = 64

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ProtocolError(Exception):
    """A request (or reply) that breaks the protocol; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    timeout_ms: int | None = None


STAGES = ("text", "video", "timeout", "error")  # what blocked a verdict


@dataclass(frozen=True)
class Verdict:
    """A safety decision: the one type the worker, the client, the proxy's cache and trainers share.

    `safe`; `reason` (why, for a person); `stage`: what blocked it (one of STAGES), None when safe;
    `fault`: blocked because something failed (a guard raised or returned junk, Qwen3Guard's answer
    had no label, the check timed out, a worker bug), not because the content was judged unsafe:
    such a verdict says nothing about the content and is never cached; `frames`: the sanitized
    (face-pixelated) frames when the input had frames and is safe, else None (they travel as the
    reply's array, not in the map)."""

    safe: bool
    reason: str
    frames: np.ndarray | None = None
    stage: str | None = None
    fault: bool = False

    @classmethod
    def passed(cls, frames: np.ndarray | None = None) -> "Verdict":
        return cls(True, "safe", frames)

    @classmethod
    def blocked(cls, reason: str, stage: str, fault: bool = False) -> "Verdict":
        return cls(False, reason, None, stage, fault)

    def to_wire(self) -> dict[str, Any]:
        """The verdict's map in a reply (docs/PROTOCOL.md); `frames` go as the reply's array."""
        return {"safe": self.safe, "reason": self.reason, "stage": self.stage, "fault": self.fault}

    @classmethod
    def from_wire(cls, result: dict[str, Any], frames: np.ndarray | None = None) -> "Verdict":
        # "fault" is new in 1.1: a 1.0 worker's blocked verdict is taken as a possible fault (never cached).
        return cls(bool(result["safe"]), str(result["reason"]), frames, result.get("stage"),
                   bool(result.get("fault", not result["safe"])))


@dataclass
class Reply:
    id: int | None
    status: str
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None
    arrays: list[np.ndarray] = field(default_factory=list)


# ---------------------------------------------------------------- encoding

def _array_frames(arrays: Sequence[np.ndarray]) -> tuple[list[dict], list]:
    descs, bufs = [], []
    for a in arrays:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays must be numpy arrays, got {type(a).__name__}")
        name = a.dtype.name
        if name not in WIRE_DTYPES:
            raise TypeError(f"dtype {a.dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        # A copy only for non-contiguous input (e.g. negative strides); the caller's array is untouched.
        # (Not np.ascontiguousarray: it turns a 0-d array into shape [1].)
        a = a if a.flags.c_contiguous else a.copy(order="C")
        descs.append({"dtype": name, "shape": list(a.shape)})
        bufs.append(memoryview(a).cast("B") if a.size else b"")
    return descs, bufs


def encode_request(req: Request) -> list:
    """Frames for a request; array buffers are passed through without copying."""
    descs, bufs = _array_frames(req.arrays)
    header = {"id": req.id, "op": req.op, "args": req.args, "arrays": descs}
    if req.timeout_ms is not None:
        header["timeout_ms"] = int(req.timeout_ms)
    return [TAG, msgpack.packb(header, use_bin_type=True), *bufs]


def encode_reply(reply: Reply) -> list:
    descs, bufs = _array_frames(reply.arrays)
    header = {"id": reply.id, "status": reply.status, "arrays": descs}
    if reply.status == STATUS_OK:
        header["result"] = reply.result
    else:
        header["error"] = reply.error
    return [TAG, msgpack.packb(header, use_bin_type=True), *bufs]


def error_reply(request_id: int | None, code: str, message: str) -> Reply:
    return Reply(id=request_id, status=STATUS_ERROR, error={"code": code, "message": message})


# ---------------------------------------------------------------- decoding

def _buffer(frame) -> memoryview:
    """The bytes of a zmq.Frame (no copy), bytes or memoryview."""
    return memoryview(getattr(frame, "buffer", frame))


def _reject_ext(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpack_header(frame, limits: Limits) -> dict:
    buf = _buffer(frame)
    if buf.nbytes > limits.max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"header is {buf.nbytes} bytes; the limit is {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            buf, raw=False, strict_map_key=True, ext_hook=_reject_ext, timestamp=0,
            max_str_len=limits.max_header_bytes, max_bin_len=limits.max_header_bytes,
            max_array_len=_MAX_CONTAINER_LEN, max_map_len=_MAX_CONTAINER_LEN, max_ext_len=0,
        )
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError...
        raise ProtocolError(BAD_MESSAGE, f"header is not one valid msgpack map: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_MESSAGE, f"header must be a msgpack map, got {type(header).__name__}")
    return header


def _check_tag(frames: Sequence) -> None:
    if len(frames) < 2:
        raise ProtocolError(BAD_MESSAGE, f"a message has at least 2 frames [tag, header], got {len(frames)}")
    tag = bytes(_buffer(frames[0]))
    if len(tag) != len(TAG) or not tag.startswith(MAGIC):
        raise ProtocolError(BAD_MESSAGE, f"first frame must be the tag {TAG!r}, got {tag[:16]!r}")
    if tag != TAG:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol major version {tag[-1]} is not supported; this side speaks {PROTOCOL_MAJOR}",
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _decode_arrays(descs, frames: Sequence, limits: Limits) -> list[np.ndarray]:
    if not isinstance(descs, list):
        raise ProtocolError(BAD_MESSAGE, "'arrays' must be a list of {dtype, shape} maps (omit it for no arrays)")
    if len(descs) != len(frames):
        raise ProtocolError(BAD_ARRAY, f"header describes {len(descs)} arrays but {len(frames)} buffer frames follow")
    arrays = []
    for i, (desc, frame) in enumerate(zip(descs, frames)):
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape"}:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] must be a map with exactly 'dtype' and 'shape'")
        dtype, shape = desc["dtype"], desc["shape"]
        if dtype not in WIRE_DTYPES:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}].dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}].shape must be a list of at most {MAX_RANK} non-negative ints")
        dt = np.dtype(dtype).newbyteorder("<")
        expected = math.prod(shape) * dt.itemsize
        buf = _buffer(frame)
        if expected != buf.nbytes:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] {dtype}{shape} needs {expected} bytes, its frame has {buf.nbytes}")
        arrays.append(np.frombuffer(buf, dtype=dt).reshape(shape) if expected else np.empty(shape, dt))
    return arrays


def decode_request(frames: Sequence, limits: Limits) -> Request:
    """Parse and validate a request (framing, header schema, op args). Raises ProtocolError."""
    _check_tag(frames)
    header = _unpack_header(frames[1], limits)
    rid = header.get("id")
    if not (_is_int(rid) and 0 <= rid <= MAX_ID):
        raise ProtocolError(BAD_MESSAGE, "'id' must be an unsigned 64-bit integer")
    try:
        unknown = set(header) - _REQUEST_KEYS
        if unknown:
            raise ProtocolError(BAD_MESSAGE, f"unknown header fields {sorted(map(str, unknown))}; allowed: {sorted(_REQUEST_KEYS)}")
        op = header.get("op")
        if not isinstance(op, str):
            raise ProtocolError(BAD_MESSAGE, "'op' must be a string")
        if op not in OPS:
            raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r}; ops are {sorted(OPS)}")
        # An optional field is omitted or well-typed: nil is ill-typed too (bad_message for each of them).
        args = header.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError(BAD_MESSAGE, "'args' must be a map (omit it for no args)")
        timeout_ms = header.get("timeout_ms", 0)
        if not (_is_int(timeout_ms) and timeout_ms >= 0):
            raise ProtocolError(BAD_MESSAGE, "'timeout_ms' must be a non-negative integer (omit it for no deadline)")
        timeout_ms = header.get("timeout_ms")
        arrays = _decode_arrays(header.get("arrays", []), frames[2:], limits)
        req = Request(id=rid, op=op, args=args, arrays=arrays, timeout_ms=timeout_ms)
        validate_request(req, limits)
        return req
    except ProtocolError as e:
        e.request_id = rid
        raise


def decode_reply(frames: Sequence, limits: Limits | None = None) -> Reply:
    """Parse a reply (client side). Raises ProtocolError on anything malformed."""
    limits = limits or Limits(max_header_bytes=64 * 2**20)
    _check_tag(frames)
    header = _unpack_header(frames[1], limits)
    if set(header) - _REPLY_KEYS:
        raise ProtocolError(BAD_MESSAGE, f"unknown reply fields {sorted(map(str, set(header) - _REPLY_KEYS))}")
    rid, status = header.get("id"), header.get("status")
    if rid is not None and not _is_int(rid):
        raise ProtocolError(BAD_MESSAGE, "reply 'id' must be an integer or nil")
    if status == STATUS_OK:
        result = header.get("result")
        if not isinstance(result, dict):
            raise ProtocolError(BAD_MESSAGE, "an ok reply carries a 'result' map")
        return Reply(id=rid, status=status, result=result, arrays=_decode_arrays(header.get("arrays", []), frames[2:], limits))
    if status == STATUS_ERROR:
        err = header.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
            raise ProtocolError(BAD_MESSAGE, "an error reply carries 'error': {code, message}")
        return Reply(id=rid, status=status, error=err)
    raise ProtocolError(BAD_MESSAGE, f"reply 'status' must be 'ok' or 'error', got {status!r}")


# ---------------------------------------------------------------- validation

def validate_request(req: Request, limits: Limits) -> None:
    """Op-level checks: args present and typed, array count, frames, sizes."""
    allowed, min_arrays, max_arrays = OPS[req.op]
    extra = set(req.args) - set(allowed)
    if extra:
        raise ProtocolError(BAD_ARGS, f"op {req.op!r} takes args {sorted(allowed)}, got unknown {sorted(map(str, extra))}")
    missing = [k for k, required in allowed.items() if required and k not in req.args]
    if missing:
        raise ProtocolError(BAD_ARGS, f"op {req.op!r} requires args {missing}")
    if not min_arrays <= len(req.arrays) <= max_arrays:
        want = f"{min_arrays}" if min_arrays == max_arrays else f"{min_arrays} to {max_arrays}"
        raise ProtocolError(BAD_ARRAY, f"op {req.op!r} takes {want} arrays, got {len(req.arrays)}")
    if req.op == "check_text":
        texts = req.args["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ProtocolError(BAD_ARGS, "'texts' must be a non-empty list of strings")
        if len(texts) > limits.max_texts:
            raise ProtocolError(TOO_LARGE, f"{len(texts)} texts in one request; the limit is {limits.max_texts}")
        for t in texts:
            validate_text(t, limits)
    elif req.op == "check_sample":
        if not isinstance(req.args["text"], str):
            raise ProtocolError(BAD_ARGS, "'text' must be a string")
        validate_text(req.args["text"], limits)
    elif req.op == "shutdown" and not isinstance(req.args.get("token", ""), str):
        raise ProtocolError(BAD_ARGS, "'token' must be a string")
    if req.op in ("check_video", "check_sample"):
        for a in req.arrays:
            validate_frames(a, limits)


def validate_text(text: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise ProtocolError(TOO_LARGE, f"text has {len(text)} characters; the limit is {limits.max_text_chars}")


def validate_frames(frames: np.ndarray, limits: Limits) -> None:
    """Video frames must be uint8 [T, H, W, 3] with T > 0 and within the size limits."""
    if frames.dtype != np.uint8:
        raise ProtocolError(BAD_ARRAY, f"frames must be uint8 RGB, got {frames.dtype} (convert with .astype(np.uint8) after scaling to 0..255)")
    if frames.ndim != 4:
        raise ProtocolError(BAD_ARRAY, f"frames must have shape [T, H, W, 3], got rank {frames.ndim} {list(frames.shape)} (add a leading axis for one image: img[None])")
    t, h, w, c = frames.shape
    if c != 3:
        raise ProtocolError(BAD_ARRAY, f"frames must have 3 channels (RGB, channels last), got shape {list(frames.shape)}")
    if t == 0 or h == 0 or w == 0:
        raise ProtocolError(BAD_ARRAY, f"frames must not be empty, got shape {list(frames.shape)}")
    if t > limits.max_frames:
        raise ProtocolError(TOO_LARGE, f"{t} frames; the limit is {limits.max_frames}")
    if h > limits.max_side or w > limits.max_side:
        raise ProtocolError(TOO_LARGE, f"frame size {h}x{w}; the limit is {limits.max_side} per side")
    if frames.nbytes > limits.max_video_bytes:
        raise ProtocolError(TOO_LARGE, f"video is {frames.nbytes} bytes; the limit is {limits.max_video_bytes}")
