"""Dynamic batching in the worker: batched verdicts equal one-at-a-time verdicts, byte for byte.

The equivalence tests send the same mixed requests, from several clients at once, to a batching
worker and to a `--max-batch 1` worker (both the real checker on the tiny checkpoint, faces "all")
and compare every reply. The left-padding test runs the worker's batched Qwen3Guard generate on a
random-weight Qwen3 (the tiny guard's hand-set weights ignore positions, so they could not catch a
position-id or attention-mask mistake).
"""
import concurrent.futures
import queue
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from safety_worker import SafetyClient
from safety_worker.server import Batching, BatchGatherer
from safety_worker.tiny import (
    BLOCKED_PHRASE, BLOCKLIST_WORD, CONTROVERSIAL_PHRASE, EXACT_MATCH_WORD, SAFE_EXAMPLE, UNPARSEABLE_PHRASE,
)

MIXED_TEXTS = [
    SAFE_EXAMPLE,
    f"Please {BLOCKED_PHRASE} tonight.",
    f"let us {CONTROVERSIAL_PHRASE} at length, with many more words to make this prompt much longer than the rest",
    UNPARSEABLE_PHRASE,
    f"a {BLOCKLIST_WORD} on the table",
    f"the {EXACT_MATCH_WORD} sings",
    "Dogs.",
    f"{SAFE_EXAMPLE} {BLOCKED_PHRASE} {CONTROVERSIAL_PHRASE}",
]


def _frames(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _mixed_requests():
    """(op, args, arrays) covering every verdict kind, two frame sizes and 1- and 3-frame clips."""
    reqs = [("check_text", {"texts": MIXED_TEXTS[i:i + 3]}, []) for i in range(0, len(MIXED_TEXTS), 3)]
    for i, text in enumerate(MIXED_TEXTS):
        shape = [(1, 32, 32, 3), (3, 32, 32, 3), (2, 24, 40, 3)][i % 3]
        reqs.append(("check_sample", {"text": text}, [_frames(i, shape)]))
    reqs.append(("check_sample", {"text": SAFE_EXAMPLE}, []))
    reqs.append(("check_video", {}, [_frames(100, (3, 32, 32, 3))]))
    reqs.append(("check_video", {}, [_frames(101, (1, 24, 40, 3))]))
    return reqs


def _send_concurrently(endpoint, reqs, n_clients=3):
    """Every request in flight at once, spread over `n_clients` clients; replies in request order."""
    clients = [SafetyClient(endpoint, timeout=120) for _ in range(n_clients)]
    try:
        futures = [clients[i % n_clients]._submit(op, args, arrays, lambda rep: rep) for i, (op, args, arrays) in enumerate(reqs)]
        return [f.result(timeout=180) for f in futures]
    finally:
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def unbatched_faces_worker(spawn_tiny_worker):
    with spawn_tiny_worker("all", "--max-batch", "1") as worker:
        yield worker


def _batching_stats(endpoint):
    with SafetyClient(endpoint, timeout=30) as c:
        return c.stats()["batching"]


def test_batched_replies_equal_unbatched_replies_byte_for_byte(tiny_safety_worker_faces, unbatched_faces_worker):
    reqs = _mixed_requests()
    before = _batching_stats(tiny_safety_worker_faces.endpoint)
    batched = _send_concurrently(tiny_safety_worker_faces.endpoint, reqs)
    after = _batching_stats(tiny_safety_worker_faces.endpoint)
    alone = _send_concurrently(unbatched_faces_worker.endpoint, reqs)
    # The batching worker really batched (fewer batches than requests); the other one did not.
    assert after["jobs"] - before["jobs"] == len(reqs)
    assert after["batches"] - before["batches"] < len(reqs)
    unbatched = _batching_stats(unbatched_faces_worker.endpoint)
    assert unbatched["batches"] == unbatched["jobs"] >= len(reqs)
    kinds = set()
    for (op, _, arrays), got, want in zip(reqs, batched, alone):
        assert got.status == want.status == "ok"
        assert got.result == want.result, op
        assert len(got.arrays) == len(want.arrays)
        for g, w, sent in zip(got.arrays, want.arrays, arrays):
            assert g.dtype == w.dtype == np.uint8 and g.shape == w.shape == sent.shape
            assert g.tobytes() == w.tobytes()
            assert not np.array_equal(g, sent)  # faces "all": really pixelated
        for v in got.result.get("verdicts", [got.result]):
            kinds.add(v["reason"].split(":")[0] if not v["safe"] else "safe")
            if "Controversial" in v["reason"]:
                kinds.add("Controversial")
            if "no 'Safety:' label" in v["reason"]:
                kinds.add("unparseable")
    assert {"safe", "BLOCKLIST", "QWEN3GUARD", "Controversial", "unparseable"} <= kinds


def test_batching_reports_itself_in_hello_and_stats(tiny_safety_worker, unbatched_faces_worker):
    from safety_worker.server import Batching

    assert tiny_safety_worker.hello["batching"] == Batching().to_dict()
    assert unbatched_faces_worker.hello["batching"]["max_batch"] == 1
    s = _batching_stats(unbatched_faces_worker.endpoint)
    assert s["batches"] == s["jobs"] and s["max_batch"] == 1  # --max-batch 1: one request per batch


class _Guard:
    """Holds a real transformers model and tokenizer, as cosmos_guardrail's Qwen3Guard does."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


@pytest.fixture(scope="module")
def random_qwen_guard():
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from safety_worker.tiny import _build_text_guard_tokenizer

    tokenizer = _build_text_guard_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, initializer_range=0.5)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # end-of-sequence after 1 to ~30 tokens here, so rows finish at different steps
        model.lm_head.weight[eos] *= 2
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return _Guard(model, tokenizer)


def test_left_padded_guard_generate_equals_one_prompt_at_a_time(random_qwen_guard):
    import torch

    from safety_worker.server import qwen3guard_generate

    prompts = ["a", "a much longer prompt that needs no padding at all", "two words", "let us debate"]
    with torch.no_grad():
        alone = [qwen3guard_generate(random_qwen_guard, [p])[0] for p in prompts]
        together = qwen3guard_generate(random_qwen_guard, prompts)
    assert together == alone
    assert len({tuple(a[:3]) for a in alone}) == len(alone)  # the random model answers each prompt differently
    assert len({len(a) for a in alone}) == len(alone)  # and rows end at different steps (the cut after EOS matters)


# ---------------------------------------------------------------- how batches form

def _job(peer: bytes):
    return SimpleNamespace(peer=peer, request=SimpleNamespace(op="check_sample", args={"text": "x"},
                                                              arrays=[np.zeros((1, 2, 2, 3), np.uint8)]))


def _put_later(q, jobs, delay):
    timer = threading.Timer(delay, lambda: [q.put(j) for j in jobs])
    timer.start()
    return timer


def test_a_batch_waits_for_the_clients_the_previous_batch_answered_so_alternating_groups_merge():
    # The lock seen with 8 window-1 clients: batch {A..D} ran while B0..B3 queued; when it ends,
    # the B requests are waiting and A0..A3 are about to send again. Counting the previous batch
    # alone (4) would start {B0..B3} at once, and the two groups would take turns forever.
    jobs = queue.Queue()
    gatherer = BatchGatherer(jobs, Batching(max_batch=32, max_batch_frames=64, wait_ms=5000))
    group_a, group_b = [_job(b"A%d" % i) for i in range(4)], [_job(b"B%d" % i) for i in range(4)]
    for j in group_a:
        jobs.put(j)
    assert gatherer.next_batch() == group_a  # takes what is queued
    for j in group_b:
        jobs.put(j)
    timer = _put_later(jobs, group_a, 0.2)
    t = time.monotonic()
    batch = gatherer.next_batch()
    timer.join()
    assert sorted(j.peer for j in batch) == sorted(j.peer for j in group_a + group_b)
    assert time.monotonic() - t < 4  # it started when the last client was in, not at the deadline


def test_a_quiet_client_costs_one_wait_and_a_lone_client_never_waits():
    jobs = queue.Queue()
    gatherer = BatchGatherer(jobs, Batching(max_batch=32, max_batch_frames=64, wait_ms=1000))
    a, b = _job(b"A"), _job(b"B")
    jobs.put(a), jobs.put(b)
    assert gatherer.next_batch() == [a, b]
    _put_later(jobs, [a], 0.05)  # B went quiet: this batch waits for it, once
    t = time.monotonic()
    assert gatherer.next_batch() == [a]
    assert time.monotonic() - t >= 0.9
    for _ in range(3):  # one client, one request in flight: sent after its verdict
        _put_later(jobs, [a], 0.05)
        t = time.monotonic()
        assert gatherer.next_batch() == [a]
        assert time.monotonic() - t < 0.5


def _texts(count: int):
    return SimpleNamespace(request=SimpleNamespace(op="check_text", args={"texts": ["x"] * count}, arrays=[]))


def _clip(frames: int):
    return SimpleNamespace(request=SimpleNamespace(op="check_video", args={},
                                                   arrays=[np.zeros((frames, 2, 2, 3), np.uint8)]))


def test_a_batch_is_cut_at_max_batch_texts_or_max_batch_frames_and_the_overflow_starts_the_next():
    """Each text of a check_text counts one toward max_batch, each clip its frames toward max_batch_frames;
    the check that would overflow a batch starts the next one, one bigger than the limits runs alone, and a
    stop queued behind checks ends the gathering only after they ran."""
    jobs = queue.Queue()
    gatherer = BatchGatherer(jobs, Batching(max_batch=4, max_batch_frames=8, wait_ms=0))
    queued = [_texts(3), _texts(2), _clip(5), _clip(3), _clip(1), _clip(12), _texts(1)]
    for job in [*queued, None]:
        jobs.put(job)
    batches = []
    while (batch := gatherer.next_batch()) is not None:
        batches.append([next(k for k, job in enumerate(queued) if job is taken) for taken in batch])
    # 3 texts (2 more would make 5) | 2 texts + 5 frames + 3 frames (4 units, 8 frames: both caps reached) |
    # 1 frame (12 more would make 13) | 12 frames, alone | 1 text, then the stop.
    assert batches == [[0], [1, 2, 3], [4], [5], [6]]
