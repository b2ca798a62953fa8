"""The model side of inference: `generate_batch` (samples -> one `model.generate`) and `BatchingEngine`,
one model thread that answers whatever requests arrived together as one batch. `python -m
theworld.generate` and `python -m theworld.serve` both run their requests through one engine.

Triton's dynamic batcher, in small: the thread takes the first waiting job, waits at most
`batch_wait` seconds for more (up to `max_batch`), groups what it has by generation settings, and runs
each group as one `model.generate` (`generate_batch`).
Rows are left padded and clips of several lengths share a batch (`world_num_frames`); each row keeps
its own `max_tokens` (the batch generates the longest, rows are cut to theirs). A group that fails is
retried job by job, so one bad job cannot fail the others. The HTTP event loop never runs the model:
`/health` answers while a batch is generating.

Groups (jobs that can share one `generate`): greedy jobs (`temperature` 0) together; sampled jobs with
the same `temperature` and `top_p` together; a sampled job with a `seed` alone (so that it is
reproducible); text-only jobs apart from jobs with frames (Gemma 3's processor takes all or none);
with a model that rolls out (`num_world_steps > 0`), only clips of one length.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from theworld.inference.messages import InferenceError

_STOP = object()


@dataclass
class GeneratedBatch:
    """What `generate_batch` returns: each row's new tokens, its prompt length, and the world latents."""

    new_tokens: torch.Tensor  # [B, N] token ids after each prompt (padding after an early end of turn)
    prompt_tokens: list[int]  # real (unpadded) prompt tokens per row
    world_latents: torch.Tensor | None  # [B, 16, T, h, w], rollout included; None without a world

    def answer(self, model, row: int, max_new_tokens: int | None = None) -> str:
        """Row `row`'s answer text, optionally cut to its first `max_new_tokens` tokens."""
        tokens = self.new_tokens[row] if max_new_tokens is None else self.new_tokens[row, :max_new_tokens]
        return model.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def generate_batch(model, collator, samples: list[dict], *, max_new_tokens: int, **generation_kwargs) -> GeneratedBatch:
    """Answer samples (already checked, sanitised frames) in one `model.generate` call.

    `collator` is a `TheWorldCollator(model, for_generation=True)`. The world is encoded (and rolled out)
    once, so the same latents feed the answer and any rollout video."""
    batch = {k: v.to(model.device) for k, v in collator(samples).items()}
    world_latents = None
    with torch.no_grad():
        if "world_pixel_values" in batch:
            world_latents = model.encode_world(batch.pop("world_pixel_values"), batch["world_num_frames"])
            batch["world_latents"] = world_latents
        output = model.generate(**batch, max_new_tokens=max_new_tokens, **generation_kwargs)
    return GeneratedBatch(output[:, batch["input_ids"].shape[1]:].cpu(), batch["attention_mask"].sum(dim=1).tolist(),
                          world_latents)


@dataclass
class Job:
    """One request for the model: a sample with the worker's sanitised frames, and how to answer it."""

    sample: dict  # {"id", "messages", "images"}; no images: a text-only question (no world tokens)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rollout: int = 0
    future: Future | None = None


@dataclass
class Generation:
    answer: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    rollout_frames: np.ndarray | None = None  # raw decoded rollout, uint8 [F, H, W, 3]: check before showing
    batch_size: int = 1
    batch_row: int = 0  # this job's row in its batch (row 0 stands for the batch in the metrics of a remote engine)


def resolve_rollout(rollout: int | None, has_frames: bool, *, num_world_steps: int, has_world: bool) -> int:
    """The rollout a request gets (None: the model's own `num_world_steps`), or `rollout_unavailable` for one
    a model with `num_world_steps` (and a world path, `has_world`) cannot make."""
    if rollout is None:
        return num_world_steps if has_frames else 0
    if rollout and not has_world:
        raise InferenceError("rollout_unavailable", "this model has no world path (enable_world=False): no rollout")
    if rollout and not has_frames:
        raise InferenceError("rollout_unavailable", "a rollout continues a clip: add at least one image part",
                             field="rollout")
    if num_world_steps and rollout not in (0, num_world_steps):
        raise InferenceError("rollout_unavailable", f"this model was trained with num_world_steps={num_world_steps}: "
                                                    f"ask rollout {num_world_steps} (or 0 for no video)", field="rollout")
    return rollout


class BatchingEngine:
    """Runs `model` on a thread of its own. `submit(job)` returns a Future of a `Generation`.

    Args:
        model: a `TheWorld` in eval mode (not shared with other threads while the engine runs), or a
            function returning one: it is then called on first use (`python -m theworld.generate` loads
            nothing for a request the safety worker refused).
        max_batch: most jobs in one `generate` (1 turns batching off).
        batch_wait: seconds the thread waits for more jobs after the first one arrives.
        max_queue: jobs allowed to wait; more are refused with 503 `overloaded`.
        rollout_steps, fps, rollout_seed: denoising steps, frame rate and noise seed of rollouts. `rollout_steps`
            None: the model's own (`config.world_rollout_steps`, the steps it was trained with), else 35.
        on_batch: called with each group's size (metrics).
        generation_kwargs: passed to every `generate` call.
    """

    def __init__(self, model, *, max_batch: int = 8, batch_wait: float = 0.01, max_queue: int = 64,
                 rollout_steps: int | None = None, fps: int = 16, rollout_seed: int = 0, on_batch=None, **generation_kwargs):
        self._model = model
        self._model_lock = threading.Lock()
        self.max_batch, self.batch_wait, self.max_queue = max_batch, batch_wait, max_queue
        self.rollout_steps, self.fps, self.rollout_seed = rollout_steps, fps, rollout_seed
        self.on_batch = on_batch or (lambda size: None)
        self.generation_kwargs = generation_kwargs
        if isinstance(model, torch.nn.Module):
            self._prepare(model)
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="BatchingEngine", daemon=True)
        self._thread.start()

    @property
    def model(self):
        """The model (loaded now if the engine was given a function that loads it)."""
        if not isinstance(self._model, torch.nn.Module):
            with self._model_lock:
                if not isinstance(self._model, torch.nn.Module):
                    self._prepare(self._model())
        return self._model

    def _prepare(self, model) -> None:
        from theworld.data.collator import TheWorldCollator

        self.collator = TheWorldCollator(model, for_generation=True)
        # Text-only questions: Gemma 3 alone, no world tokens (the processor takes images for all rows or none).
        self.text_collator = TheWorldCollator(model, for_generation=True, world=False)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._eos.add(model.processor.tokenizer.convert_tokens_to_ids("<end_of_turn>"))
        if model.config.num_world_steps:  # the answer's own rollout
            from theworld.modeling.rollout import RolloutConfig

            model.rollout_config = RolloutConfig(num_inference_steps=self._steps(model), fps=self.fps,
                                                 seed=self.rollout_seed)
        self._model = model

    def _steps(self, model) -> int:
        """Denoising steps of a rollout: as asked, else as the model was trained (a k > 0 model), else
        `RolloutConfig`'s default (the Video2World pipeline's 35)."""
        from theworld.modeling.rollout import RolloutConfig

        return self.rollout_steps or model.config.world_rollout_steps or RolloutConfig.num_inference_steps

    @property
    def processor(self):
        """The model's `TheWorldProcessor` (what the server measures requests with)."""
        return self.model.processor

    def resolve_rollout(self, rollout: int | None, has_frames: bool = True) -> int:
        """The rollout a request gets (`resolve_rollout` for this model)."""
        return resolve_rollout(rollout, has_frames, num_world_steps=self.model.config.num_world_steps,
                               has_world=self.model.world_encoder is not None)

    async def generate(self, job: Job) -> Generation:
        """`submit`, awaited (the pipeline's call: a remote engine answers the same)."""
        return await asyncio.wrap_future(self.submit(job))

    async def status(self) -> dict | None:
        """Extra `/ready` facts of the model side: none for a model in this process."""
        return None

    def submit(self, job: Job) -> Future:
        if self._queue.qsize() >= self.max_queue:
            raise InferenceError("overloaded", f"{self._queue.qsize()} requests are waiting for the model "
                                               f"(--max-queue {self.max_queue}); try again shortly")
        job.future = Future()
        job.future.set_running_or_notify_cancel()
        self._queue.put(job)
        return job.future

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ the model thread

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    self._queue.put(_STOP)
                    break
                jobs.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(self._group_key(job), []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _group_key(self, job: Job) -> tuple:
        sampled = job.temperature > 0
        key = (sampled, job.temperature if sampled else None, job.top_p if sampled else None)
        if sampled and job.seed is not None:
            key += ("alone", next(self._ids))
        if not job.sample.get("images"):
            key += ("text",)
        elif self.model.config.num_world_steps:
            key += ("frames", len(job.sample["images"]))
        return key

    def _run_group(self, group: list[Job]) -> None:
        try:
            results = self._generate(group)
        except Exception as e:  # noqa: BLE001  (answered per job below)
            if len(group) > 1:
                for job in group:  # one bad job must not fail the others
                    self._run_group([job])
                return
            group[0].future.set_exception(e)
            return
        self.on_batch(len(group))
        for job, result in zip(group, results):
            job.future.set_result(result)

    def _generate(self, group: list[Job]) -> list[Generation]:
        first = group[0]
        kwargs = dict(self.generation_kwargs)
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            kwargs.update(do_sample=False)
        collator = self.collator if first.sample.get("images") else self.text_collator
        generated = generate_batch(self.model, collator, [job.sample for job in group],
                                   max_new_tokens=max(job.max_tokens for job in group), **kwargs)
        results = []
        for row, job in enumerate(group):
            tokens = generated.new_tokens[row, :job.max_tokens].tolist()
            ended = next((i for i, t in enumerate(tokens) if t in self._eos), None)
            results.append(Generation(
                answer=generated.answer(self.model, row, job.max_tokens),
                finish_reason="length" if ended is None else "stop",
                prompt_tokens=generated.prompt_tokens[row],
                completion_tokens=len(tokens) if ended is None else ended + 1,
                rollout_frames=self._rollout(job, generated.world_latents, row) if job.rollout else None,
                batch_size=len(group),
                batch_row=row,
            ))
        return results

    def _rollout(self, job: Job, world_latents: torch.Tensor, row: int) -> np.ndarray:
        """The observed clip plus `job.rollout` predicted latent frames, decoded (raw: not yet checked)."""
        from theworld.modeling.rollout import RolloutConfig, decode_world_latents
        from theworld.configuration_theworld import latent_frames

        model = self.model
        latents = world_latents[row:row + 1]
        with torch.no_grad():
            if not model.config.num_world_steps:  # the answer had no rollout: make one for the video
                latents = latents[:, :, :latent_frames(len(job.sample["images"]))]
                config = RolloutConfig(num_inference_steps=self._steps(model), fps=self.fps,
                                       seed=self.rollout_seed if job.seed is None else job.seed)
                latents = model.roll_out(latents, job.rollout, config)
            return decode_world_latents(model.world_encoder, latents)[0]
