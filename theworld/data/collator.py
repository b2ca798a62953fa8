"""TheWorldCollator: samples -> a batch that `TheWorld(**batch)` and `TheWorld.generate(**batch)` accept.

Everything about turning a sample into model inputs is `TheWorldProcessor`'s (the chat template, the
world block of the sample's clip, Gemma's pixels of the last frame, the Cosmos clip); the collator adds
what only a batch has: padding and the labels.

A sample is `{"id", "messages", "images"}`: `images` is a clip of `F = 1 + 4k` frames of one size,
oldest first (an image is `F = 1`), and the user message has one `{"type": "image"}` for it; an optional
`gemma_frame` is the index of the frame Gemma sees (default -1, the last). A batch
may mix clip lengths: the world tokens are expanded per sample, rows are padded to the longest, and the
clips are padded with zero frames after their last (`world_num_frames` says how many are real; the model
encodes each clip on its own frames).

Labels are -100 everywhere except the final assistant answer (its text and the `<end_of_turn>` that
ends it), so `model(**batch).loss` trains the answer only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from theworld.modeling.fusion import IGNORE_INDEX

END_OF_TURN = "<end_of_turn>"


class TheWorldCollator:
    """Collate samples `{"id", "messages", "images"}` into model inputs.

    Args:
        model_or_processor: a `TheWorld` (its `processor` is used), or a `TheWorldProcessor`.
        world: add the world (default: the processor's `enable_world`). `world=False` on a world model
            gives the same model's inputs without world tokens (Gemma's own inputs only).
        for_generation: collate prompts only (the final assistant message, if any, is dropped), end with
            the generation prompt `<start_of_turn>model\\n`, pad on the left, and return no labels.
        padding_side: `"right"` (default for training) or `"left"` (always for generation).
        max_length: refuse (ValueError) rows longer than this many tokens, rather than truncating
            through an image or the answer.
        world_pixels: `False` keeps the world blocks and `world_num_frames` but leaves out
            `world_pixel_values` (the clips are not preprocessed for the VAE), for a caller that passes
            `world_latents` it encoded before.
    """

    def __init__(self, model_or_processor, *, world: bool | None = None, for_generation: bool = False,
                 padding_side: str | None = None, max_length: int | None = None, world_pixels: bool = True):
        self.processor = getattr(model_or_processor, "processor", None) or model_or_processor
        if not hasattr(self.processor, "render"):
            raise TypeError("pass a TheWorld model or its TheWorldProcessor (model.processor)")
        self.world = self.processor.enable_world if world is None else world
        if self.world and not self.processor.enable_world:
            raise ValueError("world=True needs a model built with enable_world=True")
        self.for_generation = for_generation
        self.padding_side = "left" if for_generation else (padding_side or "right")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if for_generation and padding_side == "right":
            raise ValueError("generation needs left padding (new tokens are appended on the right)")
        self.max_length = max_length
        self.world_pixels = world_pixels
        self.tokenizer = self.processor.tokenizer
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def _encode(self, conversations: list[list[dict]], clips: list[list], add_generation_prompt: bool,
                world_pixels: bool = True, gemma_frames: list[int] | None = None) -> dict:
        """The processor's encoding; `world_pixels=False` keeps the world blocks in the text (same token ids)
        but skips preprocessing the clips for the VAE (~0.1 s a 9-frame 480x640 clip on a CPU, measured by
        hand)."""
        texts = [self.processor.render(messages, num_frames=len(clip), add_generation_prompt=add_generation_prompt,
                                       with_world=self.world and bool(clip))
                 for messages, clip in zip(conversations, clips)]
        if self.world and not all(clips):
            raise ValueError("a world sample needs its clip: every sample must have 'images'")
        return self.processor(text=texts, clips=clips, with_world=self.world if world_pixels else False,
                              gemma_frames=gemma_frames)

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        clips = [list(sample.get("images") or []) for sample in samples]
        # A sample may name the frame Gemma sees ("gemma_frame", default the last: the oracle's clips end in the future).
        gemma_frames = [int(sample.get("gemma_frame", -1)) for sample in samples]
        if self.for_generation:
            prompts = [s["messages"][:-1] if s["messages"][-1]["role"] == "assistant" else s["messages"]
                       for s in samples]
            encoded = self._encode(prompts, clips, add_generation_prompt=True, world_pixels=self.world_pixels,
                                   gemma_frames=gemma_frames)
            labels = None
        else:
            for sample in samples:
                if sample["messages"][-1]["role"] != "assistant":
                    raise ValueError(f"sample {sample.get('id')!r} has no final assistant answer to train on")
            encoded = self._encode([s["messages"] for s in samples], clips, add_generation_prompt=False,
                                   world_pixels=self.world_pixels, gemma_frames=gemma_frames)
            # Only the prompt's token ids are needed (where the answer starts): not its clips' VAE input.
            prompt_ids = self._encode([s["messages"][:-1] for s in samples], clips, add_generation_prompt=True,
                                      world_pixels=False)["input_ids"]
            labels = [self._answer_labels(ids, prompt, sample.get("id"))
                      for ids, prompt, sample in zip(encoded["input_ids"], prompt_ids, samples)]

        batch = self._pad(encoded, labels)
        if any(clips):
            batch["pixel_values"] = torch.stack([torch.as_tensor(np.asarray(p)) for p in encoded["pixel_values"]])
        if "world_pixel_values" in encoded:
            batch["world_pixel_values"] = encoded["world_pixel_values"]
            batch["world_num_frames"] = encoded["world_num_frames"]
        elif self.world and any(clips):
            batch["world_num_frames"] = torch.tensor([len(clip) for clip in clips])
        if self.max_length is not None:
            lengths = batch["attention_mask"].sum(dim=1)
            if int(lengths.max()) > self.max_length:
                raise ValueError(f"rows of {lengths.tolist()} tokens exceed max_length={self.max_length}")
        return batch

    def _answer_labels(self, ids: list[int], prompt: list[int], sample_id) -> list[int]:
        """-100 on the prompt; the answer tokens and their closing <end_of_turn> keep their ids."""
        ids, prompt = list(ids), list(prompt)
        start = 0
        while start < min(len(ids), len(prompt)) and ids[start] == prompt[start]:
            start += 1
        # A tokenizer may merge the generation prompt's last piece with the answer's first one; that one
        # token is then labelled. Any earlier difference means the answer cannot be located.
        if start < len(prompt) - 1:
            raise ValueError(
                f"sample {sample_id!r}: the prompt does not tokenize to a prefix of the full conversation (they "
                f"differ at token {start} of {len(prompt)}), so the answer cannot be located; check the chat template"
            )
        labels = [IGNORE_INDEX] * len(ids)
        end = len(ids)
        while end > start and ids[end - 1] != self.end_of_turn_id:
            end -= 1  # trailing "\n" after <end_of_turn> is template formatting, not answer
        labels[start:end] = ids[start:end]
        return labels

    def _pad(self, encoded: dict, labels: list[list[int]] | None) -> dict[str, torch.Tensor]:
        rows = encoded["input_ids"]
        types = encoded.get("token_type_ids") or [[0] * len(r) for r in rows]
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id

        def pad(row, fill):
            padding = [fill] * (width - len(row))
            return padding + list(row) if self.padding_side == "left" else list(row) + padding

        batch = {
            "input_ids": torch.tensor([pad(r, pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
            "token_type_ids": torch.tensor([pad(t, 0) for t in types]),
        }
        if labels is not None:
            batch["labels"] = torch.tensor([pad(r, IGNORE_INDEX) for r in labels])
        return batch
