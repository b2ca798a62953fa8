"""TheWorldCollator: samples -> a batch that `TheWorld(**batch)` and `TheWorld.generate(**batch)` accept.

For each sample it renders the Gemma 3 chat template, marks the world after the world image
(`<start_of_world><end_of_world>` right after its `<start_of_image>`), lets the Gemma 3 processor
expand the image tokens and compute `pixel_values` / `token_type_ids`, pads the batch, and splices the
world placeholders into every row (`theworld.modeling.fusion.insert_world_tokens`, the same code the
model uses). The world image is the sample's last image (the current observation), resized and
scaled for the Cosmos VAE exactly as the Video2World pipeline does (`world_pixel_values`).

Labels are -100 everywhere except the final assistant answer (its text and the `<end_of_turn>` that
ends it), so `model(**batch).loss` trains the answer only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from theworld.modeling.fusion import IGNORE_INDEX, insert_world_tokens
from theworld.modeling.world_encoder import preprocess_world_images

END_OF_TURN = "<end_of_turn>"


class TheWorldCollator:
    """Collate samples `{"id", "messages", "images"}` into model inputs.

    Args:
        model_or_processor: a `TheWorld` (everything is read from it), or its `processor` together with
            `config` (a `TheWorldConfig` whose token ids are filled in, i.e. `model.config`).
        config: required when a processor is passed.
        num_world_tokens: world tokens per sample; read from the model when one is passed.
        for_generation: collate prompts only (the final assistant message, if any, is dropped), end with
            the generation prompt `<start_of_turn>model\\n`, pad on the left, and return no labels.
        padding_side: `"right"` (default for training) or `"left"` (always for generation).
        max_length: refuse (ValueError) rows longer than this many tokens after world insertion, rather
            than truncating through an image or the answer.
    """

    def __init__(self, model_or_processor, *, config=None, num_world_tokens: int | None = None,
                 for_generation: bool = False, padding_side: str | None = None, max_length: int | None = None):
        if hasattr(model_or_processor, "processor") and hasattr(model_or_processor, "config"):
            model = model_or_processor
            self.processor = model.processor
            self.config = model.config
            self.num_world_tokens = model.num_world_tokens
        else:
            if config is None:
                raise ValueError("pass config=model.config together with a processor (or pass the TheWorld model)")
            self.processor = model_or_processor
            self.config = config
            self.num_world_tokens = num_world_tokens
        self.enable_world = bool(self.config.enable_world)
        if self.enable_world and not self.num_world_tokens:
            raise ValueError("num_world_tokens is required with a processor (model.num_world_tokens)")
        if self.enable_world and self.config.sow_token_index is None:
            raise ValueError("the config has no world token ids: use the config of a TheWorld built by from_pretrained")
        self.for_generation = for_generation
        self.padding_side = "left" if for_generation else (padding_side or "right")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if for_generation and padding_side == "right":
            raise ValueError("generation needs left padding (new tokens are appended on the right)")
        self.max_length = max_length
        self.tokenizer = self.processor.tokenizer
        self.world_image_size = self.config.resolved_world_image_size
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    # ------------------------------------------------------------------ text

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        if self.enable_world:
            boi = self.processor.boi_token
            at = text.rfind(boi)
            if at < 0:
                raise ValueError("a world sample needs an image: its messages have no {'type': 'image'} entry")
            at += len(boi)
            text = text[:at] + self.config.sow_token + self.config.eow_token + text[at:]
        return text

    def _tokenize(self, texts: list[str], images: list[list]) -> dict:
        # The chat template already starts with <bos>: no second one from the tokenizer.
        kwargs = dict(text=texts, add_special_tokens=False)
        if any(images):
            if not all(images):
                raise ValueError("mix of samples with and without images in one batch; Gemma 3 needs all or none")
            kwargs["images"] = images
        return self.processor(**kwargs)

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        images = [list(sample.get("images") or []) for sample in samples]
        if self.for_generation:
            prompts = [s["messages"][:-1] if s["messages"][-1]["role"] == "assistant" else s["messages"]
                       for s in samples]
            encoded = self._tokenize([self._render(m, add_generation_prompt=True) for m in prompts], images)
            labels = None
        else:
            for sample in samples:
                if sample["messages"][-1]["role"] != "assistant":
                    raise ValueError(f"sample {sample.get('id')!r} has no final assistant answer to train on")
            full_texts = [self._render(s["messages"], add_generation_prompt=False) for s in samples]
            prompt_texts = [self._render(s["messages"][:-1], add_generation_prompt=True) for s in samples]
            encoded = self._tokenize(full_texts, images)
            prompt_ids = self._tokenize(prompt_texts, images)["input_ids"]
            labels = [self._answer_labels(ids, prompt, sample.get("id"))
                      for ids, prompt, sample in zip(encoded["input_ids"], prompt_ids, samples)]

        batch = self._pad(encoded, labels)
        if any(images):
            batch["pixel_values"] = torch.stack([torch.as_tensor(np.asarray(p)) for p in encoded["pixel_values"]])
        if self.enable_world:
            batch.update(insert_world_tokens(
                batch["input_ids"], self.num_world_tokens, sow_id=self.config.sow_token_index,
                eow_id=self.config.eow_token_index, world_id=self.config.world_token_index,
                attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                labels=batch.get("labels"),
            ))
            batch["world_pixel_values"] = preprocess_world_images([row[-1] for row in images],
                                                                  *self.world_image_size)
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
