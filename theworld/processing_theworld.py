"""TheWorldProcessor: the one place that turns chat messages and clips into TheWorld's inputs.

As LLaVA's processor expands `<image>` into image tokens, this processor expands each sample's world
block into world tokens: after the clip's `<start_of_image>` it writes `<start_of_world>`, one
`<world_soft_token>` per world token of *that* clip (the count depends on its length), and
`<end_of_world>`. Gemma 3's own processing then expands the image and computes `pixel_values` of the
clip's last frame (the current observation, all Gemma sees), while the whole clip is preprocessed for
the Cosmos VAE (`world_pixel_values`, `world_num_frames`). The model never expands tokens itself.

Saved and loaded with the model (`processor_config.json` next to the weights); get it as
`model.processor`, or build one with `TheWorldProcessor.from_theworld_config`.

This module sits beside the model, not below or above it: it imports the configuration and the video
processing only, and the model (which never imports it) finds it through transformers' `AutoProcessor`
registry, where this module registers it, as a custom transformers processor is registered.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from transformers import AddedToken, AutoProcessor, Gemma3Processor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import PROCESSOR_NAME

from theworld.configuration_theworld import TheWorldConfig, latent_frames
from theworld.video_processing_theworld import preprocess_world_clips


class TheWorldProcessor(Gemma3Processor):
    r"""Gemma 3's processor plus world tokens.

    Args:
        image_processor, tokenizer, chat_template, image_seq_length: as `Gemma3Processor`; the tokenizer
            holds the world tokens.
        enable_world (`bool`): expand world blocks and preprocess world clips (False: exactly Gemma 3's
            processor).
        world_tokens_per_frame (`int`): world tokens per latent frame (`WorldProjector.tokens_per_frame`).
        num_world_steps (`int`): latent frames a world rollout adds after each clip's own.
        world_max_frames (`int`): most latent frames (clip plus rollout) one sample may have.
        world_image_size (`list[int]`): `[height, width]` the Cosmos VAE sees.
        sow_token, eow_token, world_token (`str`): the world block's tokens.
    """

    def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length: int = 256,
                 enable_world: bool = True, world_tokens_per_frame: int = 0, num_world_steps: int = 0,
                 world_max_frames: int = 1, world_image_size: list[int] | None = None,
                 sow_token: str = "<start_of_world>", eow_token: str = "<end_of_world>",
                 world_token: str = "<world_soft_token>", **kwargs):
        self.enable_world = enable_world
        self.world_tokens_per_frame = world_tokens_per_frame
        self.num_world_steps = num_world_steps
        self.world_max_frames = world_max_frames
        self.world_image_size = list(world_image_size) if world_image_size is not None else None
        self.sow_token, self.eow_token, self.world_token = sow_token, eow_token, world_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_seq_length=image_seq_length,
                         **kwargs)

    @classmethod
    def from_theworld_config(cls, config: TheWorldConfig, world_tokens_per_frame: int,
                             saved_directory: str | os.PathLike | None = None, **hub_kwargs) -> "TheWorldProcessor":
        """The processor of a TheWorld with `config`: the one saved in `saved_directory` (a directory written by
        `TheWorld.save_pretrained`) if it holds one, else the base Gemma 3's (`gemma_model_name_or_path`), with
        the world tokens added to its tokenizer either way (`hub_kwargs`: `revision`, `cache_dir`, ...)."""
        if saved_directory is not None and (Path(saved_directory) / PROCESSOR_NAME).is_file():
            base = cls.from_pretrained(saved_directory)
        else:
            base = AutoProcessor.from_pretrained(config.gemma_model_name_or_path, **hub_kwargs)
        tokens = [config.sow_token, config.eow_token, config.world_token]
        # Adding a token the tokenizer already holds (a saved processor's) keeps its id.
        base.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
        return cls.from_gemma_processor(base, config, world_tokens_per_frame)

    @classmethod
    def from_gemma_processor(cls, processor: Gemma3Processor, config, world_tokens_per_frame: int) -> "TheWorldProcessor":
        """Wrap the base model's processor (its tokenizer must already hold the world tokens) for `config`."""
        return cls(
            processor.image_processor, processor.tokenizer, chat_template=processor.chat_template,
            image_seq_length=processor.image_seq_length, enable_world=bool(config.enable_world),
            world_tokens_per_frame=world_tokens_per_frame, num_world_steps=config.num_world_steps,
            world_max_frames=config.world_max_frames,
            world_image_size=list(config.resolved_world_image_size) if config.enable_world else None,
            sow_token=config.sow_token, eow_token=config.eow_token, world_token=config.world_token,
        )

    # ------------------------------------------------------------------ world tokens

    def num_world_tokens(self, num_frames: int) -> int:
        """World tokens of a clip of `num_frames` frames (1 + 4k), rollout frames included."""
        frames = latent_frames(num_frames) + self.num_world_steps
        if frames > self.world_max_frames:
            raise ValueError(
                f"a {num_frames}-frame clip is {latent_frames(num_frames)} latent frame(s), plus {self.num_world_steps} "
                f"rolled out: more than world_max_frames={self.world_max_frames}; use a clip of at most "
                f"{1 + 4 * (self.world_max_frames - self.num_world_steps - 1)} frames"
            )
        return frames * self.world_tokens_per_frame

    def world_block(self, num_frames: int) -> str:
        """`<start_of_world>`, the clip's world tokens, `<end_of_world>`."""
        return self.sow_token + self.world_token * self.num_world_tokens(num_frames) + self.eow_token

    def insert_world_block(self, text: str, num_frames: int) -> str:
        """Place the world block right after the clip's `<start_of_image>` (the last one in `text`)."""
        at = text.rfind(self.boi_token)
        if at < 0:
            raise ValueError("a world sample needs its clip in the messages: add one {'type': 'image'} entry")
        at += len(self.boi_token)
        return text[:at] + self.world_block(num_frames) + text[at:]

    # ------------------------------------------------------------------ processing

    def render(self, messages: list[dict], *, num_frames: int | None, add_generation_prompt: bool,
               with_world: bool | None = None) -> str:
        """The chat template applied to `messages`, with the world block of a `num_frames`-frame clip."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        if self._with_world(with_world) and num_frames:
            text = self.insert_world_block(text, num_frames)
        return text

    def __call__(self, text: str | list[str] | None = None, clips: Sequence[Sequence] | None = None, *,
                 with_world: bool | None = None, return_tensors: str | None = None,
                 gemma_frames: Sequence[int] | None = None, **kwargs) -> BatchFeature:
        """Tokenize `text` (already rendered by `render`: world blocks expanded) and preprocess `clips`.

        Args:
            text: one rendered string per sample.
            clips: one clip per sample (a list of uint8 `[H, W, 3]` frames or PIL images, oldest first, all of
                one size; an image is a one-frame clip). Gemma gets each clip's last frame.
            with_world: add the Cosmos inputs (default: `enable_world`).
            gemma_frames: per clip, the index of the frame Gemma gets (default: -1, the last). The oracle arm of
                `scripts/eval_imagination.py` appends the true future to the clip for the world path and keeps
                Gemma on the last observed frame.
            return_tensors: `"pt"` to pad and return tensors, else lists (the collator pads itself).

        Returns `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values` (the last frames), and with the
        world `world_pixel_values` `[B, 3, F_max, H, W]` and `world_num_frames` `[B]` (shorter clips are padded
        with zero frames after their last; the model encodes each clip on its own frames).
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        kwargs.setdefault("add_special_tokens", False)  # the chat template already starts with <bos>
        if clips is not None:
            clips = [list(clip) for clip in clips]
            if len(clips) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(clips)} clips")
            for clip in clips:
                _check_one_size(clip)
            if any(clips) and not all(clips):
                raise ValueError("mix of samples with and without images in one batch; Gemma 3 needs all or none")
            if self._with_world(with_world) and all(clips):
                for row, clip in zip(texts, clips):
                    blocks = row.count(self.sow_token)
                    if blocks != 1 or self.world_token * self.num_world_tokens(len(clip)) not in row:
                        raise ValueError(
                            f"each text needs the world block of its {len(clip)}-frame clip (found {blocks} "
                            f"'{self.sow_token}'): render it with TheWorldProcessor.render(..., num_frames={len(clip)})"
                        )
        if gemma_frames is None:
            gemma_frames = [-1] * len(clips or [])
        elif clips is None or len(gemma_frames) != len(clips):
            raise ValueError(f"gemma_frames needs one frame index per clip, got {len(gemma_frames)}")
        images = [[clip[k]] for clip, k in zip(clips, gemma_frames)] if clips and all(clips) else None
        if return_tensors is not None:
            kwargs.update(return_tensors=return_tensors, padding=True)
        encoded = super().__call__(images=images, text=texts, **kwargs)
        if self._with_world(with_world) and images is not None:
            height, width = self.world_image_size
            pixels, counts = preprocess_world_clips(clips, height, width)
            encoded["world_pixel_values"], encoded["world_num_frames"] = pixels, counts
        return encoded

    def _with_world(self, with_world: bool | None) -> bool:
        if with_world and not self.enable_world:
            raise ValueError("this processor belongs to a model built with enable_world=False: it has no world tokens")
        return self.enable_world if with_world is None else with_world


def _check_one_size(clip: list) -> None:
    sizes = {tuple(getattr(frame, "shape", None) or (frame.size[1], frame.size[0], 3)) for frame in clip}
    if len(sizes) > 1:
        raise ValueError(f"the frames of one clip must share one size, got {sorted(sizes)}")


# How `TheWorld.from_pretrained` finds this class without importing this module (see the module docstring).
AutoProcessor.register(TheWorldConfig, TheWorldProcessor)

__all__ = ["TheWorldProcessor"]
