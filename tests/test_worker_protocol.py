"""Wire-level behaviour: every malformed or hostile message gets one clear error reply, and the
worker keeps serving. Messages are built by hand here (not through SafetyClient), as a client
written from docs/PROTOCOL.md alone would, against both worker fronts (`worker_front`: a single
worker and `serve --replicas 2`), which must not answer differently."""
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from safety_worker import protocol as P


@pytest.fixture(scope="module")
def raw(worker_front):
    """A bare DEALER on the shared worker: send frames, get the decoded reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker_front.endpoint)

    def roundtrip(frames):
        sock.send_multipart(frames)
        assert sock.poll(30_000), "no reply"
        return P.decode_reply(sock.recv_multipart(copy=False))

    yield roundtrip
    sock.close()
    ctx.term()


def _header(**fields):
    return msgpack.packb({"id": 7, "op": "ping", **fields})


GOOD = [P.TAG, _header()]
U8 = np.zeros((1, 4, 4, 3), np.uint8)


@pytest.mark.parametrize("frames, code", [
    ([b"SWKR\x02", _header()], "unsupported_version"),
    ([b"HTTP/", _header()], "bad_message"),
    ([P.TAG], "bad_message"),
    ([P.TAG, b"\xc1garbage"], "bad_message"),
    ([P.TAG, _header() + b"\x00"], "bad_message"),  # trailing bytes after the map
    ([P.TAG, msgpack.packb([1, "ping"])], "bad_message"),  # not a map
    ([P.TAG, msgpack.packb({"op": "ping"})], "bad_message"),  # missing id
    ([P.TAG, msgpack.packb({"id": -1, "op": "ping"})], "bad_message"),
    ([P.TAG, msgpack.packb({"id": 7})], "bad_message"),  # missing op
    ([P.TAG, _header(op="format_disk")], "unknown_op"),
    ([P.TAG, _header(extra=1)], "bad_message"),
    ([P.TAG, _header(timeout_ms="soon")], "bad_message"),
    ([P.TAG, _header(timeout_ms=None)], "bad_message"),  # nil is ill-typed for every optional field
    ([P.TAG, _header(args=None)], "bad_message"),
    ([P.TAG, _header(arrays=None)], "bad_message"),
    ([P.TAG, _header(args=[])], "bad_message"),
    ([P.TAG, _header(args={"x": 1})], "bad_args"),
    ([P.TAG, _header(op="check_text", args={})], "bad_args"),
    ([P.TAG, _header(op="check_text", args={"texts": "not a list"})], "bad_args"),
    ([P.TAG, _header(op="check_text", args={"texts": []})], "bad_args"),
    ([P.TAG, _header(op="check_text", args={"texts": ["x" * 40_000]})], "too_large"),
    ([P.TAG, _header(op="check_sample", args={"text": 5})], "bad_args"),
    ([P.TAG, _header(op="check_video")], "bad_array"),  # no frames
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "uint8", "shape": [1, 4, 4, 3]}])], "bad_array"),
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "uint8", "shape": [1, 4, 4, 3]}]), b"short"], "bad_array"),
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "object", "shape": [1]}]), b"x"], "bad_array"),
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "uint8", "shape": [-1, 4, 4, 3]}]), U8.tobytes()], "bad_array"),
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "uint8", "shape": [1, 4, 4, 3]}]), U8.tobytes(), b"x"], "bad_array"),
    ([P.TAG, _header(op="check_video", arrays=[{"dtype": "uint8", "shape": [2000, 1, 1, 3]}]), bytes(6000)], "too_large"),
    ([P.TAG, msgpack.packb({"id": 7, "op": "ping", "args": msgpack.ExtType(5, b"x")})], "bad_message"),
    ([P.TAG, _header(op="shutdown", args={"token": "guess"})], "forbidden"),
    ([P.TAG, _header(op="shutdown")], "forbidden"),  # no token at all: forbidden too, as the doc says
    ([P.TAG, _header(op="shutdown", args={"token": 5})], "bad_args"),
])
def test_malformed_request_gets_one_error_reply_and_worker_keeps_serving(raw, frames, code):
    reply = raw(frames)
    assert reply.status == "error" and reply.error["code"] == code, reply.error
    assert reply.error["message"]
    assert raw(GOOD).status == "ok"


def test_error_reply_carries_the_request_id_when_it_could_be_read(raw):
    assert raw([P.TAG, _header(op="nope")]).id == 7
    assert raw([P.TAG, b"\xc1"]).id is None


def test_echo_returns_buffers_unchanged(raw):
    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.zeros((0, 5), np.uint8), np.array(7, np.int64)]
    req = P.Request(id=9, op="echo", arrays=arrays)
    reply = raw(P.encode_request(req))
    assert reply.id == 9
    assert len(reply.arrays) == len(arrays)
    for got, sent in zip(reply.arrays, arrays):
        assert got.dtype == sent.dtype and got.shape == sent.shape  # a 0-d array stays 0-d
        np.testing.assert_array_equal(got, sent)


def test_a_req_socket_gets_its_reply_with_the_delimiter_echoed(worker_front):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker_front.endpoint)
    try:
        # Answered by the front itself, and by the checker (queued, answered later): a REQ socket
        # wedges after a reply it cannot match, so each must come back.
        for rid, op, args in ((1, "ping", {}), (2, "hello", {}), (3, "check_text", {"texts": ["a calm lake via REQ"]})):
            sock.send_multipart([P.TAG, _header(id=rid, op=op, args=args)])
            assert sock.poll(30_000), f"no reply to a REQ socket's {op}"
            reply = P.decode_reply(sock.recv_multipart(copy=False))
            assert (reply.id, reply.status) == (rid, "ok"), reply.error
    finally:
        sock.close()
        ctx.term()


@pytest.mark.parametrize("timeout_ms", [2**64 - 1, 60_000])
def test_any_uint64_timeout_ms_is_a_deadline_not_an_error(raw, timeout_ms):
    text = f"a calm lake, timeout {timeout_ms}"
    reply = raw([P.TAG, _header(op="check_text", args={"texts": [text]}, timeout_ms=timeout_ms)])
    assert reply.status == "ok", reply.error
    assert [v["safe"] for v in reply.result["verdicts"]] == [True]


def test_a_check_not_started_within_timeout_ms_is_skipped(raw):
    reply = raw([P.TAG, _header(op="check_text", args={"texts": ["a calm lake, never started"]}, timeout_ms=0)])
    assert reply.status == "error" and reply.error["code"] == "deadline_exceeded", reply.error
    assert reply.error["message"].startswith("not started within timeout_ms=0")


def test_hello_describes_the_process_that_owns_the_endpoint(worker_front, raw):
    hello = raw([P.TAG, _header(op="hello")]).result
    assert hello["protocol"] == [P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR] == [1, 1]
    lock = Path(worker_front.endpoint.removeprefix("ipc://") + ".lock")
    assert hello["pid"] == int(lock.read_text()) == worker_front.pid
    assert hello["endpoint"] == worker_front.endpoint
    assert raw([P.TAG, _header(op="ping")]).result["instance_id"] == hello["instance_id"]
    with urllib.request.urlopen(hello["metrics_url"], timeout=10) as r:  # both serve --metrics-port 0
        assert "safety_worker_checks_total" in r.read().decode()


def test_request_roundtrip_through_the_codec():
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    req = P.Request(id=3, op="check_sample", args={"text": "hi"}, arrays=[frames[:, ::-1]], timeout_ms=50)
    wire = [bytes(f) for f in P.encode_request(req)]
    back = P.decode_request(wire, P.Limits())
    assert (back.id, back.op, back.args, back.timeout_ms) == (3, "check_sample", {"text": "hi"}, 50)
    np.testing.assert_array_equal(back.arrays[0], frames[:, ::-1])


def test_arrays_that_cannot_travel_are_refused_by_the_encoder():
    with pytest.raises(TypeError, match="cannot travel"):
        P.encode_request(P.Request(id=1, op="echo", arrays=[np.array(["a"], dtype=object)]))


def test_curve_key_files_follow_the_documented_format(tmp_path):
    """docs/PROTOCOL.md "CURVE key files": what a client in another language parses, with a regex."""
    import re
    import stat

    import zmq.auth
    from zmq.utils import z85

    from safety_worker.security import create_keys

    create_keys(tmp_path / "keys")
    line = re.compile(r'^\s+(public|secret)-key = "(.{40})"$', re.M)
    for name, kinds in (("server.key", ["public"]), ("server.key_secret", ["public", "secret"]),
                        ("client.key_secret", ["public", "secret"]), ("authorized/client.key", ["public"])):
        path = tmp_path / "keys" / name
        text = path.read_text()
        assert "\nmetadata\n" in text and "\ncurve\n" in text
        keys = dict((kind, value) for kind, value in line.findall(text))
        assert sorted(keys) == kinds
        assert all(len(z85.decode(v.encode())) == 32 for v in keys.values())
        assert (keys["public"].encode(), keys.get("secret", "").encode() or None) == zmq.auth.load_certificate(str(path))
        if "secret" in kinds:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "tiny", "hf_home": "/somewhere"}, "do not apply to --preset tiny"),
    ({"preset": "local", "guardrail_dir": "/a"}, "needs --guardrail-dir and --text-guard-dir"),
    ({"preset": "local", "guardrail_dir": "/no/such/dir", "text_guard_dir": "/no/such/dir2"}, "is not a directory"),
    ({"preset": "cloud"}, "preset must be one of"),
])
def test_presets_refuse_options_that_do_not_fit_before_touching_the_environment(kwargs, message, monkeypatch):
    import os

    from safety_worker.presets import PresetError, use_preset

    monkeypatch.setenv("HF_HOME", "/unchanged")
    with pytest.raises(PresetError, match=message):
        use_preset(**kwargs)
    assert os.environ["HF_HOME"] == "/unchanged"


def test_a_local_checker_keeps_its_identity_across_starts_and_changes_with_its_files(tiny_guardrail_root, tmp_path,
                                                                                     monkeypatch):
    """`--preset local` links the checkpoints into a fresh private HF_HOME on every start: the identity that keys
    stored verdicts and curated manifests follows the files' content, not that path (nor the copies' paths)."""
    import shutil

    from safety_worker.presets import use_preset
    from safety_worker.proxy import checker_identity
    from safety_worker.server import checker_description
    from safety_worker.tiny import GUARDRAIL_REPO, TEXT_GUARD_REPO, build_tiny_guardrail

    monkeypatch.setenv("HF_HOME", "/unchanged")  # use_preset sets them: restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = build_tiny_guardrail(tiny_guardrail_root, faces="none") / "hub"
    for copy in ("a", "b"):
        for repo in (GUARDRAIL_REPO, TEXT_GUARD_REPO):
            snapshot = next((hub / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir())
            shutil.copytree(snapshot, tmp_path / copy / repo.split("/")[1])

    def start(copy):
        models = use_preset("local", guardrail_dir=str(tmp_path / copy / "Cosmos-1.0-Guardrail"),
                            text_guard_dir=str(tmp_path / copy / "Qwen3Guard-Gen-0.6B"))
        return models["hf_home"], checker_identity(checker_description(models, "block"))

    (home_1, first), (home_2, second), (_, other_copy) = start("a"), start("a"), start("b")
    assert home_1 != home_2 and first == second == other_copy
    weights = tmp_path / "b" / "Qwen3Guard-Gen-0.6B" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert start("b")[1] != first  # other weights: other verdicts, never mixed with these
