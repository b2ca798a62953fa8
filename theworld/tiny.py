"""Tiny Gemma 3 and tiny Cosmos-Predict2, built locally in the real repositories' layouts.

Nothing here reaches a model hub. The directories written are loaded by the very same
``from_pretrained`` code paths as ``google/gemma-3-4b-it`` and
``nvidia/Cosmos-Predict2-2B-Video2World``, so tests and the offline default exercise the real code:

- ``OUTDIR/gemma``: ``Gemma3ForConditionalGeneration`` weights, a byte-fallback Gemma tokenizer, the
  ``Gemma3Processor`` (image processor + Gemma 3 chat template).
- ``OUTDIR/cosmos``: a diffusers repository for ``Cosmos2VideoToWorldPipeline``: ``model_index.json``,
  ``vae/`` (``AutoencoderKLWan``), ``transformer/`` (``CosmosTransformer3DModel``), ``scheduler/``,
  ``text_encoder/`` (tiny T5) and ``tokenizer/``. The pipeline's ``safety_checker`` is not part of
  the repository (as in the real one); it lives in the safety worker.

Usage: ``python -m theworld.tiny OUTDIR`` or ``build_tiny_models(outdir)``. The tiny VAE is trained briefly as
an autoencoder on synthetic scenes (docs/world_model.md, "Tiny VAE"; minutes the first time on a machine, then
reused); ``--random-vae`` (``trained_vae=False``) keeps it random, as builds before format 5 did, for the
record and for comparisons: pass the Cosmos directory of such a build as ``--cosmos-model``.

``python -m theworld.tiny OUTDIR --real-shapes [--layers N]`` (``build_real_shape_models``) writes the
same two repositories at the real models' published shapes (``theworld.real_configs``), random weights,
only the depth cut to N layers: what `scripts/bench_memory.py` and the real-shape training run use.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the tiny models change so that cached copies are rebuilt instead of silently reused.
# 5: the trained tiny VAE (training version 1) is the default; format 4's default VAE was random.
TINY_FORMAT_VERSION = 5
_COMPLETE_MARKER = ".theworld-tiny-complete"
# The completion marker's variant of a Cosmos directory built with ``--random-vae``.
RANDOM_VAE_VARIANT = "random-vae"

# The Gemma 3 chat template (as shipped with google/gemma-3-4b-it).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

_GEMMA_SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]
# Real Gemma 3 has more embedding rows (262,208) than tokenizer entries; the tiny one keeps that
# property so code that adds tokens is tested against "never shrink the table".
TINY_GEMMA_EMBEDDING_ROWS = 384
TINY_GEMMA_IMAGE_SIZE = 32
# One image token per 8x8 SigLIP patch (no pooling): with 4 pooled tokens a small object is averaged
# away and the image path cannot read the last frame (the no-world baseline must be able to).
TINY_GEMMA_IMAGE_TOKENS = 16
# Clips the tiny VAE's latent statistics are measured on (motion-task clips, the default's data).
TINY_VAE_CALIBRATION_CLIPS = 128


def default_tiny_dir() -> Path:
    """Cache directory for the tiny models: ``$THEWORLD_TINY_DIR``, else ``~/.cache/theworld/tiny``."""
    env = os.environ.get("THEWORLD_TINY_DIR")
    return Path(env) if env else Path.home() / ".cache" / "theworld" / "tiny"


def _gemma_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in _GEMMA_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # Byte-fallback pieces: any text (including the processor's "\n\n") tokenizes without <unk>.
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab["\u2581"] = len(vocab)  # "▁", Gemma's space
    for code in range(33, 127):
        vocab.setdefault(chr(code), len(vocab))
    return vocab


def _gemma_processor(vocab: dict[str, int], image_size: int, image_tokens: int, resample: int | None = None,
                     pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)):
    """A Gemma 3 processor (byte-fallback tokenizer over ``vocab``, image processor normalising with
    ``pixel_mean``/``pixel_std``, Gemma's own by default, chat template)."""
    from transformers import AddedToken, Gemma3ImageProcessor, Gemma3Processor, GemmaTokenizerFast

    tokenizer = GemmaTokenizerFast(
        vocab=vocab,
        merges=[],
        add_bos_token=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    # Turn markers are single special tokens in Gemma's tokenizer; register the rest of the specials
    # (those already in the vocabulary keep their ids; the real tokenizer's <image_soft_token> is added
    # after its pieces, which is where it lands here too).
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _GEMMA_SPECIAL_TOKENS], special_tokens=True
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(pixel_mean),
        image_std=list(pixel_std),
        do_pan_and_scan=False,
        **({"resample": resample} if resample is not None else {}),
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=image_tokens,
    )


def _save_gemma(outdir: Path, config, processor, seed: int) -> None:
    """Random Gemma 3 weights for ``config`` (with a non-zero multimodal projection), saved with ``processor``."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from theworld.modeling.modeling_theworld import text_embedding_rms

    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # Gemma initialises this projection to zeros: the vision tower would get exactly zero gradient
        # and the image would not influence the logits. Trained checkpoints are never zero. Its inputs are
        # RMS-normalised (rms 1), so std = text_rms / sqrt(vision hidden) puts image tokens at the scale of
        # the text embeddings around them, as in a trained Gemma.
        text_rms = text_embedding_rms(model.get_input_embeddings())
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, text_rms / projection.shape[0] ** 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(outdir)
    processor.save_pretrained(outdir)


def _build_gemma(outdir: Path, seed: int) -> None:
    from transformers import Gemma3Config

    pixel_mean, pixel_std = _calibrated_pixel_statistics()
    processor = _gemma_processor(_gemma_vocab(), TINY_GEMMA_IMAGE_SIZE, TINY_GEMMA_IMAGE_TOKENS,
                                 pixel_mean=pixel_mean, pixel_std=pixel_std)
    tokenizer = processor.tokenizer
    config = Gemma3Config(
        text_config={
            "vocab_size": TINY_GEMMA_EMBEDDING_ROWS,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "max_position_embeddings": 1024,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": TINY_GEMMA_IMAGE_SIZE,
            "patch_size": 8,
            "vision_use_head": False,
        },
        mm_tokens_per_image=TINY_GEMMA_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    _save_gemma(outdir, config, processor, seed)


_T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(code) for code in range(33, 127)]


def _build_cosmos(outdir: Path, seed: int, trained_vae: bool = True) -> None:
    import torch
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    if trained_vae:
        _train_tiny_vae(vae, seed)
    _calibrate_latent_statistics(vae)
    vae.save_pretrained(outdir / "vae")

    torch.manual_seed(seed + 1)
    transformer = CosmosTransformer3DModel(
        in_channels=17,  # 16 latent channels + the conditioning-mask channel of Video2World
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
    )
    transformer.save_pretrained(outdir / "transformer")
    FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).save_pretrained(outdir / "scheduler")
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=256,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    _save_text_encoder(outdir, t5, _T5_PIECES, extra_ids=0)
    _write_model_index(outdir)


def _save_text_encoder(outdir: Path, t5, pieces: list[str], extra_ids: int) -> None:
    from transformers import T5TokenizerFast

    t5.save_pretrained(outdir / "text_encoder")
    t5_tokenizer = T5TokenizerFast(vocab=[(piece, 0.0 if i < 4 else -1.0) for i, piece in enumerate(pieces)],
                                   extra_ids=extra_ids)
    t5_tokenizer.save_pretrained(outdir / "tokenizer")


def _write_model_index(outdir: Path) -> None:
    import diffusers

    model_index = {
        "_class_name": "Cosmos2VideoToWorldPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (outdir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


@functools.cache
def _calibration_clips() -> list[list]:
    """The motion-task clips both tiny models are calibrated on (a seed no training run uses).

    Drawn with the task's former background (pixels in ``[0, 48)``), not its default ``[0, 4)``: calibrated
    on the darker clips (SigLIP pixel mean ~0.02 instead of ~0.1, and other VAE latent statistics), a
    resumed run no longer repeated an uninterrupted one bit for bit in
    tests/test_train_bad_samples.py (weights differed by ~1e-8 after the resume point; cause not isolated),
    while with ``[0, 48)`` it does, as before. Training on the default task is unaffected (measured).
    Measured again on 2026-12-01 with today's code: calibrated on ``[0, 4)``, that test's resumed run
    repeats the uninterrupted one bit for bit, so the reason above no longer holds; the tiny models keep
    ``[0, 48)`` because every recorded figure (README, docs) was measured on them.
    """
    from theworld.data.synthetic import SyntheticMotionTask

    task = SyntheticMotionTask(split="train", size=TINY_VAE_CALIBRATION_CLIPS, seed=12345, background=48)
    return [task[i]["images"] for i in range(len(task))]


def _calibrated_pixel_statistics() -> tuple[list[float], list[float]]:
    """Per-channel pixel mean and std (in [0, 1]) of the calibration clips, for the tiny SigLIP's processor.

    A trained SigLIP has learnt to see past the large constant part of its input; a random one has not.
    Normalised with Gemma's 0.5/0.5, the mostly dark synthetic frames are a near-constant input: 6 % of
    the tiny patch embeddings' second moment varied between images, and a no-world run did not read the
    square's colour in 800 steps. Real checkpoints keep their published normalisation.
    """
    import numpy as np

    frames = np.stack([frame for clip in _calibration_clips() for frame in clip]).astype(np.float64) / 255.0
    return frames.mean(axis=(0, 1, 2)).round(4).tolist(), frames.std(axis=(0, 1, 2)).round(4).tolist()


# ------------------------------------------------------------------------------------ real shapes


def _real_gemma_vocab() -> dict[str, int]:
    """Gemma 3's 262,144 tokenizer pieces with the real special-token ids; the rest byte-fallback
    pieces, ``▁``, printable ASCII and ``<unusedN>`` fillers (no text ever tokenizes to a filler)."""
    from theworld.real_configs import GEMMA_SPECIAL_TOKEN_IDS, GEMMA_TOKENIZER_PIECES

    fixed = {token: i for token, i in GEMMA_SPECIAL_TOKEN_IDS.items() if i < GEMMA_TOKENIZER_PIECES}
    taken = set(fixed.values())
    free = (i for i in range(GEMMA_TOKENIZER_PIECES) if i not in taken)
    vocab = dict(fixed)
    for piece in [f"<0x{byte:02X}>" for byte in range(256)] + ["\u2581"] + [chr(c) for c in range(33, 127)]:
        vocab[piece] = next(free)
    for n, i in enumerate(free):
        vocab[f"<unused{n}>"] = i
    return vocab


def _build_real_gemma(outdir: Path, seed: int, layers: int) -> None:
    from theworld.real_configs import (
        GEMMA_IMAGE_PROCESSOR, GEMMA_IMAGE_SEQ_LENGTH, GEMMA_SPECIAL_TOKEN_IDS, gemma_config,
    )

    processor = _gemma_processor(_real_gemma_vocab(), GEMMA_IMAGE_PROCESSOR["size"]["height"], GEMMA_IMAGE_SEQ_LENGTH,
                                 resample=GEMMA_IMAGE_PROCESSOR["resample"])
    ids = {token: processor.tokenizer.convert_tokens_to_ids(token) for token in GEMMA_SPECIAL_TOKEN_IDS}
    if ids != GEMMA_SPECIAL_TOKEN_IDS:
        raise AssertionError(f"synthesised tokenizer ids {ids} differ from Gemma 3's {GEMMA_SPECIAL_TOKEN_IDS}")
    _save_gemma(outdir, gemma_config(layers, layers), processor, seed)


def _build_real_cosmos(outdir: Path, seed: int, layers: int) -> None:
    import torch
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel

    from theworld.real_configs import (
        COSMOS_SCHEDULER_CONFIG, COSMOS_TRANSFORMER_CONFIG, COSMOS_VAE_CONFIG, T5_ENCODER_CONFIG, t5_encoder_config,
    )

    # The VAE keeps its full depth: it fixes the latents' shape and is the trainer's per-clip cost.
    torch.manual_seed(seed)
    AutoencoderKLWan(**COSMOS_VAE_CONFIG).save_pretrained(outdir / "vae")
    torch.manual_seed(seed + 1)
    CosmosTransformer3DModel(**{**COSMOS_TRANSFORMER_CONFIG, "num_layers": layers}).save_pretrained(outdir / "transformer")
    FlowMatchEulerDiscreteScheduler(**COSMOS_SCHEDULER_CONFIG).save_pretrained(outdir / "scheduler")
    torch.manual_seed(seed + 2)
    # Published in bf16 (convert_cosmos_to_diffusers.py); also keeps the widest model here at half the disk.
    t5 = T5EncoderModel(t5_encoder_config(layers)).to(torch.bfloat16)
    extra_ids = 100  # T5's <extra_id_N> sentinels: 32,000 pieces + 100 = 32,100 (the table has 32,128 rows)
    pieces = _T5_PIECES + [f"<unused{n}>" for n in range(32000 - len(_T5_PIECES))]
    assert len(pieces) + extra_ids <= T5_ENCODER_CONFIG["vocab_size"]
    _save_text_encoder(outdir, t5, pieces, extra_ids=extra_ids)
    _write_model_index(outdir)


# ------------------------------------------------------------------------------------ tiny VAE training
# A random AutoencoderKLWan mixes every pixel into every latent cell and barely sees the last frames of a
# clip; the real Wan VAE's latents are local in space and time. The tiny one is therefore trained briefly
# as an autoencoder on synthetic scenes (docs/world_model.md, "Tiny VAE": design, measurements, and what
# failed). Step counts, not a time budget, fix the result: the build is the same on every machine.
# Bump when the training below changes: trained weights are cached under this version (`_trained_vae_weights`).
TINY_VAE_TRAINING_VERSION = 1
TINY_VAE_IMAGE_SIZE = 32
TINY_VAE_SQUARE = 6  # the motion task's square
# Single frames first, then clips (issue 22's hand measurements: clips trained from the start plateaued with
# the background right and the square missing until the temporal layers learnt).
TINY_VAE_FRAME_STEPS = 300
TINY_VAE_CLIP_STEPS = 90
TINY_VAE_BATCH = 16
TINY_VAE_LEARNING_RATE = 5e-3
# The squares cover a few % of the pixels: unweighted, the cheapest solution is the background alone.
TINY_VAE_SQUARE_WEIGHT = 10.0
# Clip lengths of the second phase, cycled: one frame keeps single images right, 5 and 9 frames
# (2 and 3 latent frames) train the causal temporal downsampling.
TINY_VAE_CLIP_FRAMES = (1, 5, 9)


def synthetic_vae_scenes(generator, batch: int, num_frames: int, size: int = TINY_VAE_IMAGE_SIZE):
    """Random scenes the tiny VAE is trained on: ``(pixels, square_mask)``.

    Each clip: a static noisy background (uniform in ``[0, level)``, ``level`` drawn in ``[2, 64)``: from the
    motion task's faint background to brighter than its former one) and one square of the motion task's
    colours and side (6 px) anywhere on a wrapped scene, moving up to one pixel per frame along each axis and
    turning at a random frame half of the time (stopped, reversed and turning squares are what a world model
    must tell apart). Random colours and sides (2-10 px) were not learnt in the budget (docs/world_model.md).

    ``pixels`` ``[B, 3, F, size, size]`` in ``[-1, 1]`` (the Cosmos preprocessing's range); ``square_mask``
    ``[B, 1, F, size, size]``, 1 on the square.
    """
    import torch

    from theworld.data.synthetic import COLOURS

    def draw(*shape, low=0, high=1):
        return torch.randint(low, high, shape, generator=generator)

    level = draw(batch, 1, 1, 1, 1, low=2, high=64).float()
    background = torch.rand(batch, 3, 1, size, size, generator=generator) * level
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    colour = palette[draw(batch, high=len(palette))].view(batch, 3, 1, 1, 1)
    side = TINY_VAE_SQUARE
    start = draw(batch, 2, 1, high=size)
    before, after = draw(batch, 2, 1, low=-1, high=2), draw(batch, 2, 1, low=-1, high=2)
    turn = torch.where(torch.rand(batch, 1, 1, generator=generator) < 0.5, draw(batch, 1, 1, low=1, high=max(num_frames, 2)),
                       torch.full((batch, 1, 1), num_frames))
    t = torch.arange(num_frames).view(1, 1, -1)
    # Position at frame t: `before` velocity until the turn, `after` velocity from there on.
    position = start + before * torch.minimum(t, turn) + after * (t - turn).clamp(min=0)  # [B, 2, F]
    pixel = torch.arange(size)
    rows = (pixel.view(1, 1, -1) - position[:, 0, :, None]) % size < side  # [B, F, size]
    cols = (pixel.view(1, 1, -1) - position[:, 1, :, None]) % size < side
    mask = (rows[:, :, :, None] & cols[:, :, None, :]).unsqueeze(1).float()  # [B, 1, F, size, size]
    frames = background * (1 - mask) + colour * mask
    return frames.floor() / 127.5 - 1.0, mask


def _trained_vae_weights(seed: int) -> Path:
    """Where the trained tiny VAE of ``seed`` is kept, shared by every build on this machine.

    Training is the costly part of a tiny build (minutes on 2 cores) and a pure function of the code and
    the seed: every test session builds the tiny models into a directory of its own, and would otherwise
    train again. Keyed by ``TINY_VAE_TRAINING_VERSION``, as the tiny build is by ``TINY_FORMAT_VERSION``.
    """
    return default_tiny_dir() / "trained-vae" / f"training{TINY_VAE_TRAINING_VERSION}-seed{seed}.safetensors"


def _train_tiny_vae(vae, seed: int) -> None:
    """Train the tiny VAE as an autoencoder (posterior mean in, frames out), deterministically on one thread,
    or load the weights an earlier build of the same training version and seed trained."""
    from safetensors.torch import load_file, save_file

    cached = _trained_vae_weights(seed)
    # Builds into different directories (each test process builds into its own) hold different build locks;
    # this one makes the first of them train and the others wait for its weights instead of training too.
    with _exclusive(cached.with_name(f".{cached.name}.lock")):
        if cached.is_file():
            vae.load_state_dict(load_file(cached))
            return
        _fit_tiny_vae(vae, seed)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        save_file({name: tensor.contiguous() for name, tensor in vae.state_dict().items()}, staging)
        staging.replace(cached)  # atomic: a reader that takes no lock sees no file or the whole file


def _standardise_initial_latents(vae, generator) -> None:
    """Rescale the encoder's last 1x1 convolution so that the initial posterior means have zero mean and unit
    std per channel on a batch of training scenes.

    At PyTorch's initialisation the means vary by ~0.06 between scenes around a larger constant, and the
    decoder learns to ignore them: trained as it comes, on solid colours, its output stopped depending on
    its input within 20 steps and every scene decoded to the same mean frame (measured). Standardised, the
    same loop's output kept following its input (a data-dependent initialisation, as LSUV).
    """
    import torch

    pixels, _ = synthetic_vae_scenes(generator, 64, 1)
    with torch.no_grad():
        means = vae.encode(pixels).latent_dist.mode()
        centre, scale = means.mean(dim=(0, 2, 3, 4)), means.std(dim=(0, 2, 3, 4))
        z_dim = centre.numel()
        weight, bias = vae.quant_conv.weight, vae.quant_conv.bias  # rows [:z_dim] give the means
        weight[:z_dim] /= scale.view(-1, *[1] * (weight.dim() - 1))
        bias[:z_dim] = (bias[:z_dim] - centre) / scale


def _fit_tiny_vae(vae, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed + 100)
    optimizer = torch.optim.Adam(vae.parameters(), lr=TINY_VAE_LEARNING_RATE)
    total = TINY_VAE_FRAME_STEPS + TINY_VAE_CLIP_STEPS
    # The clip phase decays to a tenth of the rate: the last steps sharpen the square instead of moving it.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < TINY_VAE_FRAME_STEPS else
                                                 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - TINY_VAE_FRAME_STEPS) / TINY_VAE_CLIP_STEPS)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions, hence the same weights, on every machine
    try:
        _standardise_initial_latents(vae, generator)
        vae.train()
        for step in range(total):
            frames = 1 if step < TINY_VAE_FRAME_STEPS else TINY_VAE_CLIP_FRAMES[step % len(TINY_VAE_CLIP_FRAMES)]
            pixels, mask = synthetic_vae_scenes(generator, TINY_VAE_BATCH, frames)
            with torch.enable_grad():
                decoded = vae(pixels).sample
                loss = ((1 + TINY_VAE_SQUARE_WEIGHT * mask) * (decoded - pixels) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
        vae.eval()


def measure_tiny_vae(vae, clips: int = 64, seed: int = 54321) -> dict[str, float]:
    """What makes a VAE's latents usable for the motion task, measured on held-out motion-task clips.

    - ``locality``: share of the latent change (squared, normalised latents) that falls in the two latent
      cells under the square when it moves one cell (8 px) on a single frame: the first and last frame of a
      9-frame clip, same background. Chance, with no locality at all: 2 of 16 cells, 12.5 %.
    - ``temporal``: mean squared change of the last latent frame of a 9-frame clip when its last four
      frames change (the square reverses after frame 4), over the across-clip variance of that latent frame.
    - ``psnr_db``: reconstruction PSNR (posterior mean decoded, pixels in [0, 255]) of 9-frame held-out
      clips of the default task (faint background); ``square_psnr_db`` on the square's pixels alone.
    - ``frame_psnr_db``, ``frame_square_psnr_db``: the same for the clips' first frames encoded alone (one
      latent frame: the spatial layers only, without the temporal ones).
    """
    import numpy as np
    import torch

    from theworld.data.synthetic import COLOURS, DIRECTIONS, draw_motion_clip
    from theworld.modeling.world_encoder import CosmosWorldEncoder
    from theworld.video_processing_theworld import preprocess_world_clips

    rng = np.random.default_rng(seed)
    task_clips = [draw_motion_clip(TINY_VAE_IMAGE_SIZE, 9, list(COLOURS)[i % 4], DIRECTIONS[(i // 4) % 4], 6, rng)
                  for i in range(clips)]
    encoder = CosmosWorldEncoder(vae)

    def encode(batch):
        pixels, _ = preprocess_world_clips(batch, TINY_VAE_IMAGE_SIZE, TINY_VAE_IMAGE_SIZE)
        return pixels, encoder.normalize(vae.encode(pixels).latent_dist.mode())

    with torch.no_grad():
        first_pixels, first = encode([clip[:1] for clip in task_clips])
        first_decoded = vae.decode(encoder.denormalize(first)).sample.clamp(-1, 1)
        _, last = encode([clip[-1:] for clip in task_clips])
        change = ((first - last) ** 2).sum(dim=1)[:, 0].flatten(1)  # [N, cells]
        # The square sits inside one latent cell in both frames (lattice-aligned, centred): find each from
        # the pixels, not from the latents being measured.
        shares = []
        for row, clip in enumerate(task_clips):
            cells = {tuple(np.argwhere(frame.max(axis=2) >= 40).min(axis=0) // 8) for frame in (clip[0], clip[-1])}
            under = sum(float(change[row, r * (TINY_VAE_IMAGE_SIZE // 8) + c]) for r, c in cells)
            shares.append(under / float(change[row].sum()))
        pixels, latents = encode(task_clips)
        reversed_tail = [clip[:5] + clip[3::-1] for clip in task_clips]
        _, changed = encode(reversed_tail)
        last_frame = latents[:, :, -1]
        variance = ((last_frame - last_frame.mean(dim=0)) ** 2).sum(dim=(1, 2, 3)).mean()
        moved = ((changed[:, :, -1] - last_frame) ** 2).sum(dim=(1, 2, 3)).mean()
        decoded = vae.decode(encoder.denormalize(latents)).sample.clamp(-1, 1)

    def psnr(decoded, pixels):  # whole frames, and the square's pixels alone
        error = ((decoded - pixels) * 127.5) ** 2
        square = (pixels.max(dim=1, keepdim=True).values > 40 / 127.5 - 1).expand_as(error)
        return (float(10 * torch.log10(255.0**2 / error.mean())), float(10 * torch.log10(255.0**2 / error[square].mean())))

    (psnr_db, square_psnr_db), (frame_psnr_db, frame_square_psnr_db) = psnr(decoded, pixels), psnr(first_decoded, first_pixels)
    return {
        "locality": float(np.mean(shares)),
        "temporal": float(moved / variance),
        "psnr_db": psnr_db,
        "square_psnr_db": square_psnr_db,
        "frame_psnr_db": frame_psnr_db,
        "frame_square_psnr_db": frame_square_psnr_db,
    }


def _calibrate_latent_statistics(vae) -> None:
    """Set the VAE config's per-channel ``latents_mean`` / ``latents_std`` from its own latents.

    The real Wan VAE ships statistics measured on its own latents; a random tiny VAE normalised with
    those is almost constant (0.17 % of the latents' second moment varied between images), so the
    tiny one gets its own, measured the same way (per channel, over motion-task clips).
    """
    import torch

    from theworld.video_processing_theworld import preprocess_world_clips

    clips = _calibration_clips()
    size = clips[0][0].shape[0]
    pixels, _ = preprocess_world_clips(clips, size, size)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
    vae.register_to_config(latents_mean=latents.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=latents.std(dim=(0, 2, 3, 4)).tolist())


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Serialise concurrent builders (several test processes may ask for the cache at once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _marker_text(seed: int, variant: str = "tiny") -> str:
    return f"{TINY_FORMAT_VERSION} seed={seed}" + ("" if variant == "tiny" else f" {variant}")


def _is_complete(path: Path, seed: int, variant: str = "tiny") -> bool:
    marker = path / _COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == _marker_text(seed, variant)


def _build_into(target: Path, builder, seed: int, variant: str = "tiny") -> None:
    if _is_complete(target, seed, variant):
        return
    # Build next to the target and rename, so a crashed build never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(staging, seed)
        (staging / _COMPLETE_MARKER).write_text(_marker_text(seed, variant) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def is_tiny_gemma(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a tiny Gemma 3 written by ``build_tiny_models`` (any format version or seed;
    not a ``--real-shapes`` build, whose marker names its variant)."""
    marker = Path(path) / _COMPLETE_MARKER
    return marker.is_file() and len(marker.read_text().split()) == 2 and (Path(path) / "config.json").is_file()


def _build_pair(outdir, gemma_builder, cosmos_builder, seed: int, variant: str,
                cosmos_variant: str | None = None) -> tuple[Path, Path]:
    import torch

    outdir = Path(outdir) if outdir is not None else default_tiny_dir()
    outdir.mkdir(parents=True, exist_ok=True)
    gemma_dir, cosmos_dir = outdir / "gemma", outdir / "cosmos"
    with _exclusive(outdir / ".build.lock"):
        # Model construction must not leave a grad-disabled or reseeded process behind.
        with torch.random.fork_rng(devices=[]):
            _build_into(gemma_dir, gemma_builder, seed, variant)
            _build_into(cosmos_dir, cosmos_builder, seed, cosmos_variant or variant)
    return gemma_dir, cosmos_dir


def build_tiny_models(outdir: str | os.PathLike | None = None, seed: int = 0,
                      trained_vae: bool = True) -> tuple[Path, Path]:
    """Write a tiny Gemma 3 and a tiny Cosmos-Predict2 repository under ``outdir``.

    Deterministic for a given ``seed``; a directory that is already complete is reused as is.

    Args:
        trained_vae: train the tiny VAE as an autoencoder on synthetic scenes (``_train_tiny_vae``; 2-4 minutes
            on 2 cores the first time on a machine, then reused from ``default_tiny_dir()/trained-vae``), the
            default since format 5. False keeps the VAE's random weights (the default up to format 4), for
            comparisons; that build needs an ``outdir`` of its own.

    Returns:
        ``(gemma_dir, cosmos_dir)``: ``outdir/gemma`` and ``outdir/cosmos``.
    """
    if not trained_vae and outdir is None:
        # The shared cache holds the default build every run and test uses; building the random-VAE one there
        # would replace it back and forth.
        raise ValueError("a tiny build with the random VAE (trained_vae=False, --random-vae) needs its own output "
                         "directory (outdir)")
    # The markers keep the two variants apart: a random-VAE build is never reused as the default, nor the
    # other way round.
    return _build_pair(outdir, _build_gemma, functools.partial(_build_cosmos, trained_vae=trained_vae), seed, "tiny",
                       None if trained_vae else RANDOM_VAE_VARIANT)


def build_real_shape_models(outdir: str | os.PathLike, layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Write Gemma 3 4B-it and Cosmos-Predict2-2B-Video2World at their published shapes, with random weights
    and only the depth cut: ``layers`` Gemma text and SigLIP layers, Cosmos transformer blocks and T5 encoder
    layers (the Wan VAE keeps its full depth). Widths, heads, vocabulary (262,208 rows; a tokenizer with the
    real 262,144 pieces and special-token ids), image sizes (896 SigLIP, 256 image tokens) are unchanged;
    see ``theworld.real_configs`` for every figure and its source.

    Returns:
        ``(gemma_dir, cosmos_dir)``: ``outdir/gemma`` and ``outdir/cosmos``.
    """
    if layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    return _build_pair(outdir, lambda out, s: _build_real_gemma(out, s, layers),
                       lambda out, s: _build_real_cosmos(out, s, layers), seed, f"real-shapes layers={layers}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m theworld.tiny",
        description="Build a tiny Gemma 3 (OUTDIR/gemma) and a tiny Cosmos-Predict2 (OUTDIR/cosmos) for "
        "offline tests and demos; the Cosmos VAE is trained briefly as an autoencoder (2-4 minutes on 2 cores the "
        "first time on a machine, then reused from trained-vae/ in the default cache directory). Reuses directories "
        "that are already complete.",
    )
    parser.add_argument("outdir", nargs="?", default=None,
                        help=f"output directory (default: $THEWORLD_TINY_DIR or {Path('~/.cache/theworld/tiny')})")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights and the VAE's training (default: 0)")
    parser.add_argument("--real-shapes", action="store_true",
                        help="write Gemma 3 4B-it and Cosmos-Predict2-2B-Video2World at their published shapes "
                             "(random weights, depth cut to --layers; several GB) instead of the tiny models")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --real-shapes: layers/blocks kept per stack (default: 2)")
    vae = parser.add_mutually_exclusive_group()
    vae.add_argument("--random-vae", action="store_true",
                     help="keep the tiny VAE's random weights (the default up to format 4) instead of training it; "
                          "for comparisons: needs an OUTDIR of its own; see docs/world_model.md, \"Tiny VAE\"")
    vae.add_argument("--trained-vae", action="store_true",
                     help="the default: train the tiny VAE as an autoencoder on synthetic scenes (2-4 minutes on 2 "
                          "cores the first time on a machine, then reused); kept so that older commands still work")
    args = parser.parse_args(argv)
    if args.random_vae and (args.real_shapes or args.outdir is None):
        parser.error("--random-vae needs an OUTDIR of its own and no --real-shapes")
    if args.trained_vae and args.real_shapes:
        parser.error("--trained-vae is for the tiny models, not --real-shapes")
    if args.layers is not None and not args.real_shapes:
        parser.error("--layers needs --real-shapes")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a CLI that prints two paths, not shard bars
    if args.real_shapes:
        if args.outdir is None:
            parser.error("--real-shapes needs an OUTDIR (the models take several GB)")
        gemma_dir, cosmos_dir = build_real_shape_models(args.outdir, layers=args.layers or 2, seed=args.seed)
    else:
        gemma_dir, cosmos_dir = build_tiny_models(args.outdir, seed=args.seed, trained_vae=not args.random_vae)
    print(f"gemma:  {gemma_dir}\ncosmos: {cosmos_dir}")


if __name__ == "__main__":
    main()
