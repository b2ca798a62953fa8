"""The safety worker process: the real `cosmos_guardrail` checker behind the worker front.

Threads: the main thread runs the front (`front.WorkerFront`: owns the ROUTER socket, decodes,
validates, answers cheap ops at once) and queues checks; one checker thread runs the guardrail
models on queued checks and hands replies back through a queue and a wake-up (ZeroMQ sockets are
not thread-safe, so only the main thread touches the ROUTER). This keeps `hello`/`ping`/`stats`
answered while a long video is being checked, lets the queue be bounded (`busy` when full) and lets
the main thread answer *blocked* for a check that overruns `check_timeout` (fail closed) even though
the stuck computation cannot be interrupted.

Importing this module is light; `SafetyWorker` imports torch and cosmos_guardrail when it loads the
checker (which switches autograd off in this process: that is why it is a separate process).
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import re
import sys
import threading
import time
import unicodedata
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from . import protocol as P
from .endpoint import claim_endpoint
from .front import WorkerFront
from .metrics import WorkerMetrics
from .protocol import Limits, Reply, Request, Verdict

logger = logging.getLogger("safety_worker")

# Part of the checker identity that keys stored verdicts (safety_worker.proxy.checker_identity): bump it
# when verdicts change. 0.2.0: the blocklist no longer blocks every text that contains a `*`.
WORKER_VERSION = "0.2.0"
_QWEN_LABEL = re.compile(r"Safety: (Safe|Unsafe|Controversial)")


# ---------------------------------------------------------------- fail-closed checker

class GuardedChecker:
    """`cosmos_guardrail.CosmosSafetyChecker` with verdicts that fail closed, one input or a batch.

    cosmos_guardrail returns *safe* when Qwen3Guard raises or answers without a label, counts
    "Controversial" as safe, modifies the caller's frames, and its blocklist blocks every text that
    contains a `*`. Here: the blocklist's rules and word lists run through `blocklist_is_safe`, which
    blocks exactly the texts whose words they match; the Qwen3Guard step runs the same chat template,
    tokenizer and greedy generation as `Qwen3Guard.extract_label_and_categories` but a missing label is
    *blocked* and "Controversial" follows `controversial` ("block" by default); any exception anywhere
    is *blocked*; video is checked with the checker's video runner on a private copy and the result
    must be uint8 of the input shape, else *blocked*.

    `check_texts`/`check_videos` are the batched forms the worker uses to check several requests at
    once: texts through the blocklist, then one left-padded Qwen3Guard `generate`; frames of clips
    that share a size through the face filter together (`frame_batch` frames per forward pass).
    They give the same verdicts, reasons and frames as the one-input forms, and raise when the
    batch itself fails (the worker then retries each request alone, so each still fails closed on
    its own).
    """

    def __init__(self, checker, controversial: str = "block", frame_batch: int = 1, pass_pixels: int | None = None):
        """`frame_batch`: frames per face-filter forward pass (1: cosmos_guardrail's own); `pass_pixels`:
        if set, fewer frames per pass for large frames (at most this many pixels per pass, at least one
        frame)."""
        if controversial not in ("block", "allow"):
            raise ValueError("controversial must be 'block' or 'allow'")
        self.checker = checker
        self.controversial = controversial
        self.frame_batch = frame_batch
        self.pass_pixels = pass_pixels
        self._set_frame_batch(frame_batch)

    def _set_frame_batch(self, n: int) -> None:
        # RetinaFaceFilter runs batch_size frames per forward pass (1 in cosmos_guardrail).
        if self.frame_batch <= 1:
            return
        for post in getattr(getattr(self.checker, "video_guardrail", None), "postprocessors", None) or ():
            if hasattr(post, "batch_size"):
                post.batch_size = n

    # -- text

    def check_text(self, text: str) -> Verdict:
        try:
            return self.check_texts([text])[0]
        except Exception as e:  # fail closed, whatever broke
            return Verdict.blocked(_text_error(e), "text", fault=True)

    def check_texts(self, texts: Sequence[str]) -> list[Verdict]:
        """`check_text` of each text, with Qwen3Guard run once over all texts the blocklist passed.

        The guards run in the checker's order; a text blocked by one is not shown to the next. Raises
        if Qwen3Guard's batch fails (one text: `check_text` turns that into a blocked verdict)."""
        verdicts: list[Verdict | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        for guard in self.checker.text_guardrail.safety_models:
            name = type(guard).__name__.upper()
            if not pending:
                break
            if name == "QWEN3GUARD":
                answers = self._qwen3guard(guard, [texts[i] for i in pending])
            else:
                # The blocklist through `blocklist_is_safe`: its own `is_safe` blocks every text with a `*`.
                is_safe = partial(blocklist_is_safe, guard) if name == "BLOCKLIST" else guard.is_safe
                answers = []
                for i in pending:
                    try:
                        safe, message = is_safe(texts[i])
                        answers.append((safe, message, False))
                    except Exception as e:  # this text alone fails closed
                        verdicts[i] = Verdict.blocked(_text_error(e), "text", fault=True)
                        answers.append(None)
            still = []
            for i, answer in zip(pending, answers):
                if answer is None:
                    continue
                safe, message, fault = answer
                if safe:
                    still.append(i)
                else:
                    verdicts[i] = Verdict.blocked(f"{name}: {message}", "text", fault=fault)
            pending = still
        for i in pending:
            verdicts[i] = Verdict.passed()
        return verdicts

    def _qwen3guard(self, guard, prompts: Sequence[str]) -> list[tuple[bool, str, bool]]:
        """(safe, message, fault) per prompt, from one `generate` over all of them."""
        return [self._parse_qwen_answer(content) for content in qwen3guard_answers(guard, prompts)]

    def _parse_qwen_answer(self, content: str) -> tuple[bool, str, bool]:
        from cosmos_guardrail.cosmos_utils import UNSAFE_CATEGORIES

        match = _QWEN_LABEL.search(content)
        if match is None:
            return False, "answer has no 'Safety:' label, blocked (fail closed)", True
        label = match.group(1)
        categories = re.findall("(" + "|".join(map(re.escape, UNSAFE_CATEGORIES.values())) + ")", content)
        if label == "Safe" or (label == "Controversial" and self.controversial == "allow"):
            return True, "", False
        return False, f"Safety: {label}, Categories: {categories}", False

    # -- frames

    def check_video(self, frames: np.ndarray) -> Verdict:
        try:
            # The checker pixelates in place: give it a private, writable, contiguous copy.
            out = self.checker.check_video_safety(np.array(frames, dtype=np.uint8, order="C", copy=True))
        except Exception as e:
            return Verdict.blocked(_video_error(e), "video", fault=True)
        return _video_verdict(frames.shape, out)

    def check_videos(self, clips: Sequence[np.ndarray]) -> list[Verdict]:
        """`check_video` of each clip; clips of the same frame size go through the face filter together.

        Uses the checker's own video runner: its safety models per clip (none in cosmos_guardrail
        0.3.2), then its postprocessors (RetinaFaceFilter: each frame on its own, in forward passes of
        `frame_batch` frames) over the stacked frames, split back per clip. Raises if the face filter
        fails on the batch."""
        runner = self.checker.video_guardrail
        verdicts: list[Verdict | None] = [None] * len(clips)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, clip in enumerate(clips):
            try:
                safe, _ = runner.run_safety_check(clip)
            except Exception as e:
                verdicts[i] = Verdict.blocked(_video_error(e), "video", fault=True)
                continue
            if not safe:
                verdicts[i] = Verdict.blocked(_VIDEO_BLOCKED, "video")
            else:
                groups.setdefault(tuple(clip.shape[1:3]), []).append(i)
        for (h, w), members in groups.items():
            if self.pass_pixels is not None:
                self._set_frame_batch(max(1, min(self.frame_batch, self.pass_pixels // (h * w))))
            stacked = np.concatenate([np.asarray(clips[i], dtype=np.uint8) for i in members])  # a private copy
            out = runner.postprocess(stacked)
            if not isinstance(out, np.ndarray) or out.shape != stacked.shape:
                raise ValueError(f"face filter returned {getattr(out, 'shape', type(out).__name__)} for a batch of "
                                 f"{list(stacked.shape)}")  # per clip, check_video gives the exact reason
            start = 0
            for i in members:
                n = len(clips[i])
                verdicts[i] = _video_verdict(clips[i].shape, out[start:start + n])
                start += n
        return verdicts


# ---------------------------------------------------------------- the blocklist, without upstream's false positives

# Upstream's `to_ascii` leaves only ASCII in the text the blocklist censors, so a non-ASCII censor mark in
# the censored form can only be a censored word (upstream's mark, `*`, is also an ordinary character).
_CENSOR_MARK = "\u2588"


def blocklist_is_safe(blocklist, text: str) -> tuple[bool, str]:
    """(safe, message) of cosmos_guardrail's `Blocklist` for `text`: blocked exactly when its word lists match a
    word of the text, whatever other characters the text contains.

    `Blocklist.is_safe` (cosmos_guardrail 0.3.2) censors matches with `*` and then blocks any text whose
    censored form contains `*`, so every text that already has one ("What is 2*3?", "**bold**", a markdown
    bullet) is blocked. Here its three rules run in its order with its own pieces, word lists and messages
    (better-profanity's `censor` with whitelisted words restored by `uncensor_whitelist`, the same on the
    NLTK-lemmatised tokens, then `check_against_whole_word_blocklist` on the exact-match list), except that:

    - the censor mark cannot occur in the censored text (`_CENSOR_MARK`): a mark found there is a match;
    - better-profanity reads `* @ $ " '` as letters (its leetspeak: "z*rblax" is "zorblax"), so "**zorblax**"
      is one unknown word to it: each text is also read with those characters as punctuation (spaces);
    - `to_ascii` turns non-ASCII letters into spaces ("zorbl\u00e1x" becomes "zorbl x" and passes): each text is
      also read folded to ASCII where a letter stands for a Latin one (`_ascii_folded`);
    - where a match spans words, the censored text has fewer words than the text and `uncensor_whitelist`
      (which pairs words by position) raises or restores the wrong word: the match then stands;
    - an empty text has no word to match and passes (upstream blocks it; the text guard still sees it), and
      a blank line in the exact-match list is no word (upstream's `\\b\\b` then matches every text).

    A text is blocked if any of its readings is."""
    # Its word characters are ~5,900 letters and these five; to_ascii leaves only ASCII to read anyway.
    word_characters = blocklist.profanity.ALLOWED_CHARACTERS
    symbols = {i: " " for i in range(128) if chr(i) in word_characters and not chr(i).isalnum()}
    folded = _ascii_folded(text)
    for reading in dict.fromkeys((text, text.translate(symbols), folded, folded.translate(symbols))):
        safe, message = _blocklist_reading_is_safe(blocklist, reading)
        if not safe:
            return False, message
    return True, "Input is safe"


# Cyrillic and Greek letters drawn like Latin ones (a Cyrillic "\u043e" in "z\u043erblax" hides the word from
# `to_ascii`). Python ships no confusables table (Unicode TR39); these are the common look-alikes.
_LOOKALIKES = str.maketrans(dict(zip(
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u0501\u051b\u051d\u04cf"  # Cyrillic small
    "\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0425\u0406\u0408\u0405\u0423"  # Cyrillic capital
    "\u03b1\u03bf\u03c1\u03bd\u03b9\u03ba\u03c4\u03c5\u03c7"  # Greek small
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7",  # Greek capital
    "aeopcyxijsdqwl" "ABEKMHOPCTXIJSY" "aopviktux" "ABEZHIKMNOPTYX")))
_WORD = re.compile(r"\w+")


def _ascii_folded(text: str) -> str:
    """`text` with accents and compatibility forms folded (NFKD: "\u00e1" -> "a", full-width "\uff5a" -> "z") and, in
    words that also have ASCII letters, Cyrillic and Greek look-alikes read as the Latin letters they look like.
    Words wholly in another script stay as they are: Russian "\u0441\u043e\u0440" is not the English "cop"."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))

    def unmask(word: re.Match) -> str:
        w = word.group()
        return w.translate(_LOOKALIKES) if any(c.isascii() and c.isalpha() for c in w) else w

    return _WORD.sub(unmask, text)


def _blocklist_reading_is_safe(blocklist, text: str) -> tuple[bool, str]:
    import nltk
    from cosmos_guardrail.cosmos_guardrail import CENSOR
    from cosmos_guardrail.cosmos_utils import to_ascii

    text = to_ascii(text)
    lemmatised = " ".join(blocklist.lemmatizer.lemmatize(token) for token in nltk.word_tokenize(text))
    for prompt in (text, lemmatised):
        if _CENSOR_MARK in prompt:  # to_ascii and WordNet make this impossible: never guess
            raise ValueError(f"the blocklist's censor mark {_CENSOR_MARK!r} is in the text it censors")
        censored = blocklist.profanity.censor(prompt, censor_char=_CENSOR_MARK)
        if len(censored.split()) == len(prompt.split()):  # else the pairing by position is off
            censored = blocklist.uncensor_whitelist(prompt, censored)
        if _CENSOR_MARK in censored:
            return False, f"Prompt blocked by censorship: Censored Prompt: {censored.replace(_CENSOR_MARK, CENSOR)}"
    exact_match_words = [word for word in blocklist.exact_match_words if word.strip()]
    matched, message = blocklist.check_against_whole_word_blocklist(
        text, exact_match_words, blocklist.guardrail_partial_match_min_chars,
        blocklist.guardrail_partial_match_letter_count)
    return (False, message) if matched else (True, "Input is safe")


def qwen3guard_answers(guard, prompts: Sequence[str]) -> list[str]:
    """Qwen3Guard's decoded answer for each prompt, from one greedy `generate` (left-padded when several)."""
    return [guard.tokenizer.decode(row, skip_special_tokens=True) for row in qwen3guard_generate(guard, prompts)]


def qwen3guard_generate(guard, prompts: Sequence[str]) -> list[list[int]]:
    """The answer tokens Qwen3Guard generates for each prompt, as if each were generated alone.

    One prompt is exactly cosmos_guardrail's call (`Qwen3Guard.extract_label_and_categories`)."""
    tokenizer, model = guard.tokenizer, guard.model
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts]
    if len(texts) == 1:  # exactly cosmos_guardrail's call: no padding, no attention mask games
        inputs = tokenizer(texts, return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=_QWEN_MAX_NEW_TOKENS)
        rows = [generated[0][inputs.input_ids.shape[1]:].tolist()]
    else:
        # Left padding keeps every prompt's last token at the same column, so generation starts
        # together; generate derives position ids from the attention mask (cumsum), so a padded
        # prompt sees the same positions and attends to the same tokens as alone.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        extra = {"pad_token_id": pad} if model.generation_config.pad_token_id is None else {}
        generated = model.generate(**inputs, max_new_tokens=_QWEN_MAX_NEW_TOKENS, **extra)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        rows = []
        for row in generated[:, inputs.input_ids.shape[1]:].tolist():
            # Alone, generation stops after the first end-of-sequence token; in a batch the
            # finished row is padded until the others finish: cut it where it would have stopped.
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:end])
    return rows


# On a CPU RetinaFace gains from batching small frames only: 32x32 frames ~5x at 16 per pass, 240x320
# none (compute-bound), and 8 per pass measured slower under load. 2**17 pixels: 32 frames of 64x64,
# one of 240x320. A GPU gets whole batches.
_CPU_PASS_PIXELS = 2**17
_QWEN_MAX_NEW_TOKENS = 128  # as cosmos_guardrail's Qwen3Guard
_VIDEO_BLOCKED = "video guardrail blocked the frames"


def _text_error(e: Exception) -> str:
    return f"text guard error, blocked (fail closed): {type(e).__name__}: {e}"


def _video_error(e: Exception) -> str:
    return f"video guard error, blocked (fail closed): {type(e).__name__}: {e}"


def _video_verdict(shape, out) -> Verdict:
    """The checker's output for frames of `shape` as a verdict: uint8 of the same shape, else blocked."""
    if out is None:
        return Verdict.blocked(_VIDEO_BLOCKED, "video")
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != tuple(shape):
        got = f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}"
        return Verdict.blocked(f"video guard returned {got} for uint8 {list(shape)}, blocked (fail closed)", "video", fault=True)
    return Verdict.passed(out)


def load_checker(device: str = "cpu", guardrail_repo: str = "nvidia/Cosmos-1.0-Guardrail", torch_threads: int = 1):
    """Import cosmos_guardrail (autograd goes off in this process) and build the real checker."""
    import torch

    # The worker shares its node with trainers: OpenMP threads busy-waiting on shared cores made
    # checks ~15x slower here (2 threads vs 1 on a loaded 2-core machine), so default to 1.
    torch.set_num_threads(torch_threads)
    from cosmos_guardrail import CosmosSafetyChecker

    checker = CosmosSafetyChecker(checkpoint_id=guardrail_repo)
    if device != "cpu":
        checker.to(device)
    return checker


def check_request(guard: GuardedChecker, req: Request) -> Reply:
    """The reply to one check request alone (text first; a blocked text skips the video)."""
    if req.op == "check_text":
        return _texts_reply(req, [guard.check_text(t) for t in req.args["texts"]])
    text = req.args.get("text") if req.op == "check_sample" else None
    if text is not None:
        verdict = guard.check_text(text)
        if not verdict.safe or not req.arrays:
            return _verdict_reply(req, verdict)
    return _verdict_reply(req, guard.check_video(req.arrays[0]))


def check_requests(guard: GuardedChecker, reqs: Sequence[Request]) -> list[Reply]:
    """Several requests at once: all their texts in one `check_texts`, then the frames of those still
    safe in one `check_videos`. Same replies as `check_request` of each; raises if the batch itself
    fails (the caller then checks each alone). The worker's checker thread and `curate`'s actors both
    check through this, so their verdicts and frames are the same."""
    texts, owners = [], []
    for j, req in enumerate(reqs):
        mine = req.args["texts"] if req.op == "check_text" else [req.args["text"]] if req.op == "check_sample" else []
        texts += mine
        owners += [j] * len(mine)
    per_job: list[list] = [[] for _ in reqs]
    for j, verdict in zip(owners, guard.check_texts(texts) if texts else []):
        per_job[j].append(verdict)
    replies: list[Reply | None] = [None] * len(reqs)
    video = []
    for j, req in enumerate(reqs):
        if req.op == "check_text":
            replies[j] = _texts_reply(req, per_job[j])
        elif req.op == "check_sample" and (not per_job[j][0].safe or not req.arrays):
            replies[j] = _verdict_reply(req, per_job[j][0])
        else:
            video.append(j)
    for j, verdict in zip(video, guard.check_videos([reqs[j].arrays[0] for j in video]) if video else []):
        replies[j] = _verdict_reply(reqs[j], verdict)
    return replies


def checker_versions() -> dict[str, Any]:
    """The versions `hello` reports (part of the checker identity that keys stored verdicts)."""
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0], "worker": WORKER_VERSION}
    for dist in ("torch", "transformers", "cosmos-guardrail", "numpy", "pyzmq", "msgpack"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


def checker_description(models: dict[str, Any], controversial: str) -> dict[str, Any]:
    """What `hello` says about the checker itself (models, policy, versions, protocol): enough for
    `proxy.checker_identity`, so a checker loaded outside a worker (a `curate` actor) has the same
    identity as a worker serving the same models and policy."""
    return {"protocol": [P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR], "versions": checker_versions(), "models": models,
            "policy": {"controversial": controversial, "fail_closed": True}}


# ---------------------------------------------------------------- the server

@dataclasses.dataclass(frozen=True)
class Batching:
    """How the checker groups queued checks (`serve --max-batch/--max-batch-frames/--batch-wait-ms`).

    A batch takes queued checks until it holds `max_batch` texts-or-samples (each text of a
    check_text counts one, a check_video or check_sample one) or `max_batch_frames` frames; if it
    has fewer requests than were queued when it began plus those the previous batch answered (their
    clients are about to send again), it waits at most `wait_ms` after its first check for more to
    arrive (`BatchGatherer`). A check that would overflow it starts the next batch (a single check bigger
    than the limits still runs, alone). `max_batch=1`
    checks one request at a time with the face filter's own batch size, as before batching.
    `max_batch_frames` is also the face filter's forward-pass batch size (on a CPU, at most
    `_CPU_PASS_PIXELS` pixels per pass).
    Defaults: measured on CPU (docs/safety_worker.md).
    """

    max_batch: int = 32
    max_batch_frames: int = 64
    wait_ms: float = 5.0

    def __post_init__(self):
        if self.max_batch < 1 or self.max_batch_frames < 1 or self.wait_ms < 0:
            raise ValueError("max_batch and max_batch_frames must be >= 1 and wait_ms >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def split(self, reqs: Sequence[Request]) -> list[list[Request]]:
        """`reqs` (all at hand, none to wait for) cut into batches by the same limits as the queue's
        (`BatchGatherer`): a request that would overflow a batch starts the next one."""
        batches: list[list[Request]] = []
        units = frames = 0
        for req in reqs:
            u, f = _units(req), _frame_count(req)
            if not batches or self.max_batch == 1 or units + u > self.max_batch or frames + f > self.max_batch_frames:
                batches.append([])
                units = frames = 0
            batches[-1].append(req)
            units, frames = units + u, frames + f
        return batches


def _units(req: Request) -> int:
    return len(req.args["texts"]) if req.op == "check_text" else 1


def _frame_count(req: Request) -> int:
    return sum(a.shape[0] for a in req.arrays)


_STOP = object()  # the checker thread's stop signal, carried over when a batch runs into it


class BatchGatherer:
    """Forms the checker's batches from the job queue, by the rules of `Batching`.

    `next_batch` takes what is queued and waits (at most `wait_ms` after the batch's first job) for
    more while the batch holds fewer requests than were queued when it began plus those the previous
    batch answered: clients that wait for their verdicts send again as soon as they get them. With k
    clients that each keep one request in flight, a batch starts as soon as all k have sent again,
    and a lone client never waits at all. Counting only the previous batch is not enough: requests
    can split into two groups that take turns, each batch holding the requests that queued while the
    other group's batch ran (8 clients were seen locked into batches of 4 at 98 req/s, against ~135
    in batches of 8, docs/safety_worker.md; one client keeping 4 in flight into batches of 2); the
    queued group then waits for the answered one and the two merge. A client that went quiet costs
    one wait, in the batch after its last one."""

    def __init__(self, jobs: queue.Queue, batching: Batching):
        self._jobs = jobs
        self.batching = batching
        self._carry = None  # a job (or _STOP) taken from the queue that did not fit the last batch
        self._answered = 0  # requests in the previous batch

    def next_batch(self) -> list | None:
        """The next queued jobs to check together; None when the queue yields None (stop)."""
        expected = self._jobs.qsize() + (self._carry is not None) + self._answered
        first, self._carry = (self._carry or self._jobs.get()), None
        if first is None or first is _STOP:
            return None
        batch, units, frames = [first], _units(first.request), _frame_count(first.request)
        limits = self.batching
        wait_until = time.monotonic() + limits.wait_ms / 1000
        while limits.max_batch > 1 and units < limits.max_batch and frames < limits.max_batch_frames:
            left = wait_until - time.monotonic() if len(batch) < expected else 0
            try:
                job = self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._carry = _STOP  # finish this batch, then stop
                break
            u, f = _units(job.request), _frame_count(job.request)
            if units + u > limits.max_batch or frames + f > limits.max_batch_frames:
                self._carry = job  # it starts the next batch
                break
            batch.append(job)
            units, frames = units + u, frames + f
        self._answered = len(batch)
        return batch


@dataclasses.dataclass
class CheckJob:
    """A check request on its way through `CheckerCore`: queued, running, answered exactly once (`claim`).
    `envelope`: where its reply goes (a worker's ROUTER envelope; None in a fleet replica)."""

    envelope: list | None
    request: Request
    received: float
    key: str | None = None  # its content key in the verdict store (None: no store)
    started: float | None = None
    _answered: bool = False
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True exactly once: whoever claims the job sends its one reply."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True


class CheckerCore:
    """The checker half of a worker: a bounded queue of check jobs and the checker thread that checks them.

    Batches are cut by `BatchGatherer` and checked together (`check_requests`); a batch that raises is
    checked again item by item, so each verdict fails closed on its own. A job not started within its
    `timeout_ms` is skipped (`deadline_exceeded`), one running past `check_timeout` is answered blocked
    (`_overran`; its late verdict is dropped), and `metrics` counts batches and verdicts. `SafetyWorker`
    runs it behind its ZeroMQ front and each replica of a Ray Serve fleet (`fleet.GuardReplica`) runs it
    behind Serve, so the two check, batch and fail closed the same way. Subclasses say how finished jobs
    go back to whoever waits for them (`_deliver`, called on the checker thread)."""

    def _init_checker(self, guard: GuardedChecker, batching: Batching, queue_size: int, check_timeout: float,
                      store=None) -> None:
        """`store`: the verdict store that computed verdicts go into (a job's `key` says where)."""
        self.guard = guard
        self.batching = batching
        self.check_timeout = check_timeout
        self.store = store
        self.metrics = WorkerMetrics()
        self._jobs: queue.Queue[CheckJob | None] = queue.Queue(maxsize=queue_size)
        self._running: list[CheckJob] = []  # the checker's current batch (replaced, never mutated)
        self._gatherer = BatchGatherer(self._jobs, batching)
        self._checker_thread = threading.Thread(target=self._checker_loop, name="checker", daemon=True)

    def _deliver(self, done: list[tuple[CheckJob, Reply | None]]) -> None:
        """Hand a finished batch back (reply None: the job was answered already, at its check timeout)."""
        raise NotImplementedError

    def _stop_checker(self, timeout: float = 1.0) -> bool:
        """Stop the checker thread once it is idle; True if it stopped within `timeout`."""
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass  # leaving after an error with a full queue: the daemon thread dies with us
        if self._checker_thread.is_alive():
            self._checker_thread.join(timeout=timeout)
        return not self._checker_thread.is_alive()

    def _checker_stats(self) -> dict[str, Any]:
        """The checker's part of `stats`."""
        s = self.metrics.snapshot()
        running = self._running
        s["batching"].update(self.batching.to_dict())
        s.update(queued=self._jobs.qsize(), running=bool(running), running_checks=len(running))
        return s

    def _overran(self, job: CheckJob) -> Reply | None:
        """The blocked reply for `job` if it has run past `check_timeout` and nobody answered it yet."""
        if job.started is None or time.monotonic() - job.started <= self.check_timeout or not job.claim():
            return None
        logger.error("check id=%s overran %.1fs; answered blocked (fail closed)", job.request.id, self.check_timeout)
        reply = self._blocked_reply(job.request, f"checker timed out after {self.check_timeout:g}s, blocked (fail closed)")
        self._record_verdicts(job, reply, timed_out=True)
        return reply

    # -- checker thread

    def _checker_loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread; this thread only runs inference
        while True:
            jobs = self._gatherer.next_batch()
            if jobs is None:
                return
            # Every job comes back (reply None if it was answered already).
            self._deliver(list(zip(jobs, self._run_batch(jobs))))

    def _run_batch(self, jobs: list[CheckJob]) -> list[Reply | None]:
        """Replies for `jobs` (None for a job answered already): skip expired ones, check the rest
        together, and if that raises, check each alone so each verdict fails closed on its own."""
        replies: list[Reply | None] = [None] * len(jobs)
        live = []
        now = time.monotonic()
        for k, job in enumerate(jobs):
            req = job.request
            if req.timeout_ms is not None and (now - job.received) * 1000 > req.timeout_ms:
                if job.claim():
                    replies[k] = P.error_reply(req.id, P.DEADLINE_EXCEEDED, f"not started within timeout_ms={req.timeout_ms}; skipped")
            else:
                job.started = now
                live.append(k)
        if not live:
            return replies
        self._running = [jobs[k] for k in live]
        computed: list[Reply] | None = None
        try:
            if self.batching.max_batch > 1:
                try:
                    computed = self._check_batch([jobs[k].request for k in live])
                except Exception:
                    logger.exception("a batch of %d checks failed; checking each alone", len(live))
                    self.metrics.retried(len(live))
            if computed is None:
                computed = []
                for k in live:
                    jobs[k].started = time.monotonic()  # each retried check gets its own check_timeout
                    computed.append(self._check_alone(jobs[k].request))
        finally:
            self._running = []
            reqs = [jobs[k].request for k in live]
            self.metrics.batch(len(live), sum(map(_units, reqs)), sum(map(_frame_count, reqs)), time.monotonic() - now)
        for k, reply in zip(live, computed):
            if jobs[k].claim():  # else it was answered blocked at its timeout: the late verdict is dropped
                self._record_verdicts(jobs[k], reply)
                self._store(jobs[k], reply)
                replies[k] = reply
        return replies

    def _check_alone(self, req: Request) -> Reply:
        try:
            return self._check(req)
        except Exception as e:  # GuardedChecker catches checker errors; this is a bug in our code
            logger.exception("check id=%s failed", req.id)
            return self._blocked_reply(req, f"worker error, blocked (fail closed): {type(e).__name__}: {e}", stage="error")

    def _check(self, req: Request) -> Reply:
        """One request alone (`--max-batch 1`, and the retry of a failed batch)."""
        return check_request(self.guard, req)

    def _check_batch(self, reqs: list[Request]) -> list[Reply]:
        return check_requests(self.guard, reqs)

    def _store(self, job: CheckJob, reply: Reply) -> None:
        """Put a computed verdict in the verdict store (it refuses faults); a store that fails costs the
        reuse, never the reply."""
        if job.key is None or self.store is None or reply.status != P.STATUS_OK:
            return
        try:
            self.store.put(job.key, reply.result, reply.arrays)
        except Exception:
            logger.exception("verdict store %s: could not store a verdict", self.store.path)

    def _record_verdicts(self, job: CheckJob, reply: Reply, timed_out: bool = False) -> None:
        latency = time.monotonic() - job.received
        if reply.status != P.STATUS_OK:
            return
        for v in reply.result.get("verdicts", [reply.result]):
            self.metrics.verdict(v["stage"], latency, timed_out)
            latency = None  # one latency per request

    @staticmethod
    def _blocked_reply(req: Request, reason: str, stage: str = "timeout") -> Reply:
        """A fault verdict for the whole request (timeout, worker error)."""
        verdict = Verdict.blocked(reason, stage, fault=True)
        if req.op == "check_text":
            return _texts_reply(req, [verdict] * len(req.args["texts"]))
        return _verdict_reply(req, verdict)


class SafetyWorker(CheckerCore, WorkerFront):
    """A worker that checks in this process: the checker thread (`CheckerCore`) behind the front (`front.WorkerFront`)."""

    def __init__(
        self,
        endpoint: str,
        load_checker: Callable[[], Any],
        *,
        models: dict[str, Any],
        limits: Limits = Limits(),
        check_timeout: float = 60.0,
        owner_token: str | None = None,
        device: str = "cpu",
        insecure: bool = False,
        controversial: str = "block",
        parent_pid: int | None = None,
        curve_dir: str | None = None,
        batching: Batching = Batching(),
        metrics_port: int | None = None,
        verdict_store: str | None = None,
        verdict_store_bytes: int = 10 << 30,
    ):
        """`verdict_store`: the shared on-disk store (`verdict_store.VerdictStore`) to answer checks from
        before queueing them and to fill with what the checker computes (never faults)."""
        # Claim the endpoint (and open the store) before the slow checker load, so a bad or taken one fails fast.
        lock_file = claim_endpoint(endpoint, curve_dir, insecure)
        store = identity = None
        if verdict_store:  # the store shared with curate jobs, replica fronts and other workers
            from .proxy import checker_identity
            from .verdict_store import VerdictStore

            store = VerdictStore(verdict_store, verdict_store_bytes)
            # The same keys as the replica front and curate: the identity of the same description.
            identity = checker_identity(checker_description(models, controversial))
        checker = load_checker()
        super().__init__(endpoint, limits=limits, owner_token=owner_token, parent_pid=parent_pid,
                         curve_dir=curve_dir, lock_file=lock_file)
        self._init_checker(guarded_checker(checker, controversial, batching, device), batching, limits.queue_size,
                           check_timeout, store)
        self.models = models
        self.device = device
        self._done: queue.SimpleQueue[tuple[CheckJob, Reply]] = queue.SimpleQueue()
        # Jobs queued, running, or finished but not yet handed back: serving thread only. Draining
        # waits for this to reach 0 (queue and _running alone miss a job between the two).
        self._outstanding = 0
        self._grad_enabled = _grad_enabled()
        self.identity = identity
        self.answered_from_store = 0
        if metrics_port is not None:
            self.serve_metrics(metrics_port, lambda: [({}, self.snapshot_stats())])

    # -- the front's hooks

    def serve(self) -> None:
        self._checker_thread.start()
        super().serve()

    def _handle(self, envelope: list, req: Request) -> None:
        if req.op in P.CHECK_OPS:
            key = None
            if self.store is not None:
                from .proxy import content_key

                key = content_key(self.identity, req.op, req.args, req.arrays)
                try:
                    stored = self.store.get(key)
                except Exception:  # a store that fails costs the reuse, never the check
                    logger.exception("verdict store %s: could not read a verdict; checking", self.store.path)
                    stored = None
                if stored is not None:  # checked before, by this worker or any other user of the store
                    self.answered_from_store += 1
                    reply = Reply(req.id, P.STATUS_OK, result=stored[0], arrays=stored[1])
                    self._record_verdicts(CheckJob(envelope, req, time.monotonic()), reply)
                    self._send(envelope, reply, req.op)
                    return
            try:
                self._jobs.put_nowait(CheckJob(envelope, req, time.monotonic(), key=key))
                self._outstanding += 1
            except queue.Full:
                self._error(envelope, req, P.BUSY, f"{self.limits.queue_size} checks are queued; retry later")
        elif req.op == "stats":
            self._send(envelope, Reply(req.id, P.STATUS_OK, result=self.snapshot_stats()), req.op)
        elif req.op == "echo":  # transport only: the received buffers go straight back
            self._send(envelope, Reply(req.id, P.STATUS_OK, result={}, arrays=req.arrays), req.op)
        else:
            raise AssertionError(f"op {req.op} has no handler")

    def _checker_hello(self) -> dict[str, Any]:
        return checker_hello(self.models, self.guard.controversial, self.device, self.limits, self.check_timeout,
                             self.batching, self._grad_enabled)

    def _tick(self) -> None:
        for job in self._running:
            reply = self._overran(job)
            if reply is not None:
                self._send(job.envelope, reply, job.request.op)

    def _drained(self) -> bool:
        return self._outstanding == 0 or self._only_abandoned_job_left()

    def _close_back_end(self) -> None:
        if self._stop_checker() and self.store is not None:
            self.store.close()

    def _count_request(self, op: str) -> None:
        self.metrics.request(op)

    def _count_reply(self, op: str | None, reply: Reply) -> None:
        self.metrics.replied(op, None if reply.status == P.STATUS_OK else reply.error["code"])

    def _count_unroutable(self) -> None:
        self.metrics.unroutable()

    # -- serving thread

    def snapshot_stats(self) -> dict[str, Any]:
        s = self._checker_stats()
        s.update(uptime_s=time.time() - self.started_at, instance_id=self.instance_id)
        if self.store is not None:
            s["verdict_store"] = dict(self.store.snapshot(), answered=self.answered_from_store,
                                      checker_identity=self.identity)
        return s

    def _deliver(self, done: list[tuple[CheckJob, Reply | None]]) -> None:
        # Runs on the checker thread: only the serving thread sends on the ROUTER.
        for pair in done:
            self._done.put(pair)
        self.wake()

    def _send_done(self) -> None:
        while True:
            try:
                job, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._outstanding -= 1
            if reply is not None:  # None: already answered (timed out while running)
                self._send(job.envelope, reply, job.request.op)

    def _only_abandoned_job_left(self) -> bool:
        """Hung checks that were already answered blocked must not keep a draining worker alive."""
        running = self._running
        return (bool(running) and self._outstanding == len(running) and self._jobs.empty()
                and all(job._answered for job in running))

    def _error(self, envelope, req: Request, code: str, message: str) -> None:
        self._send(envelope, P.error_reply(req.id, code, message), req.op)


def guarded_checker(checker, controversial: str, batching: Batching, device: str) -> GuardedChecker:
    """`checker` wrapped as every worker-like process wraps it: the face filter's forward passes follow the
    batching (`max_batch_frames` frames; on a CPU at most `_CPU_PASS_PIXELS` pixels per pass)."""
    return GuardedChecker(checker, controversial=controversial,
                          frame_batch=batching.max_batch_frames if batching.max_batch > 1 else 1,
                          pass_pixels=_CPU_PASS_PIXELS if device == "cpu" else None)


def checker_hello(models: dict[str, Any], controversial: str, device: str, limits: Limits, check_timeout: float,
                  batching: Batching, grad_enabled: bool) -> dict[str, Any]:
    """`hello`'s description of a checker in this process (a worker, or a fleet replica)."""
    # The checker's own description is shared with curate's actors (`checker_description`), so all have
    # one identity (`proxy.checker_identity`).
    described = checker_description(models, controversial)
    return {
        "versions": described["versions"],
        "device": device,
        "models": described["models"],
        "policy": described["policy"],
        "limits": {**limits.to_dict(), "check_timeout_s": check_timeout},
        "batching": batching.to_dict(),
        "grad_enabled": grad_enabled,
        "modules_loaded": {m: m in sys.modules for m in ("cosmos_guardrail", "retinaface")},
    }


def _texts_reply(req: Request, verdicts: Sequence[Verdict]) -> Reply:
    return Reply(req.id, P.STATUS_OK, result={"verdicts": [v.to_wire() for v in verdicts]})


def _verdict_reply(req: Request, verdict: Verdict) -> Reply:
    return Reply(req.id, P.STATUS_OK, result=verdict.to_wire(),
                 arrays=[verdict.frames] if verdict.safe and verdict.frames is not None else [])


def _grad_enabled() -> bool:
    if "torch" not in sys.modules:
        return True
    return bool(sys.modules["torch"].is_grad_enabled())

