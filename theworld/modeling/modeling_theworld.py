"""TheWorld: `Gemma3ForConditionalGeneration` with Cosmos world tokens.

The forward pass, top to bottom:

1. token embeddings of `input_ids` (Gemma's scaled embedding table);
2. SigLIP image features scattered onto the `<image_soft_token>` positions (as Gemma 3 does);
3. the world clip encoded by the Cosmos VAE (`CosmosWorldEncoder`: normalised latents
   `[B, 16, T, h, w]`, `T = 1 + (F - 1) // 4` for `F` frames), optionally rolled forward by the Cosmos
   transformer (`num_world_steps`), projected by `WorldProjector` and scattered onto the
   `<world_soft_token>` positions between `<start_of_world>` and `<end_of_world>` (which
   `TheWorldProcessor` wrote: the model never expands tokens itself);
4. Gemma 3's language model on the fused embeddings; the loss on the labelled tokens only (world
   positions are always -100).

Without world inputs, or with `enable_world=False`, it is exactly `Gemma3ForConditionalGeneration`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Gemma3ForConditionalGeneration
from transformers import initialization as init
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from theworld._import_guard import assert_grad_enabled
from theworld.configuration_theworld import TheWorldConfig, latent_frames, saved_theworld_config
from theworld.modeling.fusion import IGNORE_INDEX
from theworld.modeling.latent_statistics import WorldLatentStatistics
from theworld.modeling.projector import LatentStandardizer, LatentWhitener, WorldProjector
from theworld.modeling.rollout import RolloutConfig, rollout_world_latents
from theworld.modeling.world_encoder import CosmosWorldEncoder, LatentCache, module_digest

TRAINABLE_WEIGHTS_NAME = "theworld_trainable.safetensors"
# peft's file name for a LoRA configuration: the language model's adapter, when it has one.
ADAPTER_CONFIG_NAME = "adapter_config.json"
# LoRA targets by default: the attention and MLP projections of Gemma 3's language model (TRL's Gemma 3
# recipe adapts every linear layer; SigLIP, which has q/k/v projections too, is never adapted here).
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Wan VAE of Cosmos-Predict2 downsamples height and width by 8.
VAE_SPATIAL_FACTOR = 8
# TheWorldConfig fields that `from_pretrained` accepts as keyword arguments.
WORLD_OPTIONS = (
    "enable_world", "world_projection", "world_projector_type", "world_tokens_per_side", "world_frame_tokens",
    "world_image_size", "num_world_steps", "world_max_frames", "freeze_gemma_vision", "freeze_gemma_language", "freeze_cosmos_vae",
)
# Options that may differ between saving and reloading (they do not change the saved weights' shapes).
RELOAD_OVERRIDABLE = ("freeze_gemma_vision", "freeze_gemma_language", "freeze_cosmos_vae", "num_world_steps")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP `DTensor` shard (a collective: every rank calls it), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class TheWorld(Gemma3ForConditionalGeneration):
    """Gemma 3 with Cosmos world tokens. Build it with `TheWorld.from_pretrained`.

    Attributes set by `from_pretrained`:
        processor: `TheWorldProcessor` (Gemma 3's processor with `<start_of_world>`, `<end_of_world>`
            and `<world_soft_token>` added): the one place that builds inputs; saved with the model.
        world_encoder: `CosmosWorldEncoder` (the Cosmos VAE), when `enable_world`.
        world_transformer / world_scheduler: the Cosmos transformer and its scheduler, when
            `num_world_steps > 0` or after `load_world_rollout_components()`.
        rollout_config: `theworld.modeling.rollout.RolloutConfig` (denoising steps, guidance, seed) of
            the world rollout; an inference setting, not saved.
    """

    config_class = TheWorldConfig
    config: TheWorldConfig
    _keep_in_fp32_modules_strict = ["world_projector"]
    _keys_to_ignore_on_load_missing = [r"^world_projector\."]

    def __init__(self, config: TheWorldConfig):
        assert_grad_enabled("building TheWorld")
        super().__init__(config)
        # transformers picks the loss from the class name; ours names no task, the loss is Gemma's causal LM loss.
        self.loss_type = "ForCausalLM"
        self.processor = None
        self.world_encoder: CosmosWorldEncoder | None = None
        self.world_transformer = None
        self.world_scheduler = None
        self.world_latent_statistics: WorldLatentStatistics | None = None  # set with the transformer
        self.world_projector: WorldProjector | None = None
        # peft `LoraConfig` of the adapters in the language model (`add_language_adapter`), else None.
        self.language_adapter_config = None
        # Denoising steps, guidance and seed of the world rollout (not saved: an inference setting; its steps
        # start at those the model was trained with, `config.world_rollout_steps`).
        self.rollout_config = RolloutConfig(**({"num_inference_steps": config.world_rollout_steps}
                                               if config.world_rollout_steps else {}))
        # Set to a `LatentCache` to reuse the rollouts of clips rolled out before (`roll_out`: only while the
        # Cosmos transformer is frozen); None rolls every batch out with one seeded noise draw.
        self.rollout_cache: LatentCache | None = None
        self._world_model_digest: bytes | None = None
        if config.enable_world:
            height, width = config.resolved_world_image_size
            self.world_projector = WorldProjector(
                latent_channels=config.world_latent_channels,
                latent_size=(height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR),
                hidden_size=config.text_config.hidden_size,
                max_frames=config.world_max_frames,
                projection=config.world_projection,
                projector_type=config.world_projector_type,
                tokens_per_side=config.world_tokens_per_side,
                frame_tokens=config.world_frame_tokens,
            )
            self.world_projector.float()
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, WorldProjector):
            init.zeros_(module.temporal_embedding)
            init.ones_(module.output_gain)  # from_pretrained then sets it to the text embeddings' rms
        if isinstance(module, (LatentStandardizer, LatentWhitener)):
            for buffer in module.buffers():  # running statistics: nothing seen yet
                init.zeros_(buffer)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        cosmos_model: str | os.PathLike | None = None,
        config: TheWorldConfig | None = None,
        **kwargs,
    ) -> "TheWorld":
        """Build TheWorld from a base Gemma 3 and a Cosmos repository, or reload a saved TheWorld.

        Args:
            pretrained_model_name_or_path: a Gemma 3 id or directory (`google/gemma-3-4b-it`, the tiny
                `OUTDIR/gemma`), or a directory written by `TheWorld.save_pretrained`.
            cosmos_model: Cosmos-Predict2 Video2World id or directory (`nvidia/Cosmos-Predict2-2B-Video2World`,
                the tiny `OUTDIR/cosmos`). Required with `enable_world` for a base Gemma; a saved TheWorld
                remembers it.
            enable_world, world_projection, world_projector_type, world_tokens_per_side, world_frame_tokens,
            world_image_size, num_world_steps, freeze_gemma_vision, freeze_gemma_language, freeze_cosmos_vae: see
                `TheWorldConfig`. On reload only the freeze flags may change.
            **kwargs: passed to `Gemma3ForConditionalGeneration.from_pretrained` (`dtype`, `revision`, ...).
        """
        options = {key: kwargs.pop(key) for key in WORLD_OPTIONS if key in kwargs}
        saved_dir = None
        if config is None:
            config = saved_theworld_config(pretrained_model_name_or_path)
            if config is not None:
                saved_dir = Path(pretrained_model_name_or_path)
        if config is not None:
            fixed = sorted(set(options) - set(RELOAD_OVERRIDABLE))
            if fixed:
                raise ValueError(
                    f"{fixed} are fixed by the saved TheWorld config in {pretrained_model_name_or_path}; only "
                    f"{list(RELOAD_OVERRIDABLE)} can be changed on reload"
                )
            config = TheWorldConfig.from_dict(config.to_dict())  # never mutate the caller's config
            for key, value in options.items():
                setattr(config, key, value)
            if cosmos_model is not None:
                config.cosmos_model_name_or_path = _base_id(cosmos_model)
        else:
            base_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
            if base_config.model_type != "gemma3":
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a {base_config.model_type!r} model; TheWorld needs a Gemma 3 "
                    f"image-text model (model_type 'gemma3', e.g. google/gemma-3-4b-it) or a saved TheWorld directory"
                )
            fields = {k: v for k, v in base_config.to_dict().items() if k not in ("model_type", "transformers_version")}
            config = TheWorldConfig(
                **fields,
                gemma_model_name_or_path=_base_id(pretrained_model_name_or_path),
                cosmos_model_name_or_path=_base_id(cosmos_model),
                **options,
            )
        if config.enable_world and not config.cosmos_model_name_or_path:
            raise ValueError(
                "enable_world=True needs a Cosmos model: pass cosmos_model='nvidia/Cosmos-Predict2-2B-Video2World' "
                "(or the OUTDIR/cosmos written by `python -m theworld.tiny OUTDIR`), or enable_world=False"
            )
        assert_grad_enabled("loading TheWorld")

        model = super().from_pretrained(config.gemma_model_name_or_path, *model_args, config=config, **kwargs)
        tokens_per_frame = model.world_projector.tokens_per_frame if model.world_projector is not None else 0
        processor = _processor_class().from_theworld_config(config, tokens_per_frame, saved_directory=saved_dir,
                                                            **_hub_kwargs(kwargs))
        model._adopt_world_tokens(processor.tokenizer, expected_ids=saved_dir is not None)
        model.processor = processor
        if config.enable_world:
            vae_kwargs = {"torch_dtype": kwargs["dtype"]} if isinstance(kwargs.get("dtype"), torch.dtype) else {}
            model._attach_world_encoder(CosmosWorldEncoder.from_pretrained(config.cosmos_model_name_or_path,
                                                                          **vae_kwargs))
            if config.num_world_steps > 0:
                model.load_world_rollout_components()
        if saved_dir is not None:
            if (saved_dir / ADAPTER_CONFIG_NAME).is_file():
                from peft import LoraConfig

                model.add_language_adapter(LoraConfig.from_pretrained(saved_dir))
            model._load_trainable_weights(saved_dir / TRAINABLE_WEIGHTS_NAME)
        elif model.world_projector is not None:
            model._match_world_scale_to_text()
        model.apply_freezing()
        return model

    def _match_world_scale_to_text(self) -> None:
        """Start the world tokens at the rms of Gemma's (scaled) text embeddings.

        Why: world tokens far smaller than the text around them (0.0018 vs 0.16 rms on the tiny model with
        the old init) are invisible to attention, far larger ones swamp it; at the text's scale the language
        model reads them like any other token from the first step.
        """
        with torch.no_grad():
            self.world_projector.output_gain.fill_(text_embedding_rms(self.get_input_embeddings()))

    def _adopt_world_tokens(self, tokenizer, expected_ids: bool) -> None:
        """Take the world tokens' ids from the processor's tokenizer (which holds them); grow (never shrink)
        the embedding table if needed."""
        tokens = [self.config.sow_token, self.config.eow_token, self.config.world_token]
        ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        names = ("sow_token_index", "eow_token_index", "world_token_index")
        if expected_ids and [getattr(self.config, n) for n in names] != ids:
            raise ValueError(
                f"the base tokenizer of {self.config.gemma_model_name_or_path} gives the world tokens ids {ids}, but the "
                f"saved model used {[getattr(self.config, n) for n in names]}: it was trained on a different tokenizer"
            )
        for name, token_id in zip(names, ids):
            setattr(self.config, name, token_id)
        rows = self.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            # Deterministic new rows (the mean embedding) so a reload rebuilds exactly the same table.
            self.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                weight = self.get_input_embeddings().weight
                weight[rows:] = weight[:rows].mean(dim=0, keepdim=True)

    def _attach_world_encoder(self, world_encoder: CosmosWorldEncoder) -> None:
        if world_encoder.latent_channels != self.config.world_latent_channels:
            raise ValueError(
                f"the Cosmos VAE has {world_encoder.latent_channels} latent channels but the config expects "
                f"{self.config.world_latent_channels}"
            )
        if world_encoder.spatial_factor != VAE_SPATIAL_FACTOR:
            raise ValueError(f"the Cosmos VAE downsamples by {world_encoder.spatial_factor}, expected {VAE_SPATIAL_FACTOR}")
        self.world_encoder = world_encoder.to(self.device)

    def load_world_rollout_components(self) -> None:
        """Load the Cosmos transformer and scheduler (frozen) from the Cosmos repository, for rollouts."""
        from diffusers import CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

        repo = self.config.cosmos_model_name_or_path
        transformer = CosmosTransformer3DModel.from_pretrained(repo, subfolder="transformer")
        self.world_transformer = transformer.to(self.device).requires_grad_(False)
        self.world_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(repo, subfolder="scheduler")
        # A transformer post-trained by theworld.train_world may denoise standardised latents: roll out in its space.
        self.world_latent_statistics = WorldLatentStatistics.load(repo)
        self._world_model_digest = None  # another world model: rollout cache keys change with it

    def _load_trainable_weights(self, weights_file: Path) -> None:
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file} is missing: the directory was not written by TheWorld.save_pretrained")
        state = load_file(weights_file, device=str(self.device))
        result = self.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{weights_file} holds weights this TheWorld does not have: {result.unexpected_keys[:5]}")

    def add_language_adapter(self, lora_config) -> None:
        """Put LoRA adapters (a peft `LoraConfig`) into Gemma's language model, and only there.

        The language model's own weights (and the tied embeddings / LM head) are then frozen whatever
        `freeze_gemma_language` says; the adapters, the world projector and (unless frozen) the vision
        path train. `save_pretrained` writes the adapter configuration (`adapter_config.json`) and its
        weights with the other trainable ones; `from_pretrained` puts them back.
        """
        from peft import inject_adapter_in_model

        if self.language_adapter_config is not None:
            raise ValueError("this TheWorld already has a language adapter (a saved TheWorld restores its own)")
        inject_adapter_in_model(lora_config, self.model.language_model)
        self.language_adapter_config = lora_config
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Set `requires_grad` from the config's freeze flags; the world projector is always trainable."""
        config = self.config
        self.model.vision_tower.requires_grad_(not config.freeze_gemma_vision)
        self.model.multi_modal_projector.requires_grad_(not config.freeze_gemma_vision)
        language_trains = not config.freeze_gemma_language and self.language_adapter_config is None
        self.model.language_model.requires_grad_(language_trains)
        self.lm_head.requires_grad_(language_trains)
        if self.language_adapter_config is not None:
            for name, param in self.model.language_model.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        if self.world_encoder is not None:
            vae = self.world_encoder.vae
            vae.requires_grad_(False)
            # Only the encoding half can learn: the decoder never sees a gradient from the language loss.
            vae.encoder.requires_grad_(not config.freeze_cosmos_vae)
            vae.quant_conv.requires_grad_(not config.freeze_cosmos_vae)
        if self.world_transformer is not None:
            self.world_transformer.requires_grad_(False)
        if self.world_projector is not None:
            self.world_projector.requires_grad_(True)

    def trainable_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable weights (what `save_pretrained` writes), whole and on the CPU, from `state_dict` if
        given else from the model: the parameters that train and the world projector's running latent
        statistics (learnt from the data like its weights). On a model sharded with FSDP each tensor is
        gathered from its shards, a collective: every rank calls this, and only trainable tensors travel."""
        names = [name for name, param in self.named_parameters() if param.requires_grad]
        names += [f"world_projector.{name}" for name, _ in (self.world_projector.named_buffers()
                                                             if self.world_projector is not None else [])]
        source = state_dict if state_dict is not None else {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {name: full_tensor(source[name].detach()).contiguous().cpu() for name in names}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        is_main_process: bool = True, **kwargs) -> None:
        """Write `config.json`, the processor (`TheWorldProcessor`), the LoRA configuration of the language
        adapter if there is one (`adapter_config.json`) and the trainable weights only
        (`theworld_trainable.safetensors`, with the world projector's running latent statistics and the
        adapter's weights).

        The frozen parts (Gemma, the Cosmos VAE) are rebuilt from the base ids in the config by
        `TheWorld.from_pretrained(save_directory)`. `state_dict` (e.g. from `accelerator.get_state_dict`)
        replaces the model's own tensors; other keyword arguments of the transformers API are accepted
        and ignored.
        """
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        if self.language_adapter_config is not None:
            self.language_adapter_config.save_pretrained(save_directory)
        save_file(self.trainable_state_dict(state_dict), save_directory / TRAINABLE_WEIGHTS_NAME,
                  metadata={"format": "pt"})

    # ------------------------------------------------------------------ world tokens

    def encode_world(self, world_pixel_values: torch.Tensor, world_num_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Clip pixels `[B, 3, F, H, W]` in `[-1, 1]` -> normalised latents `[B, 16, T, h, w]`, `T` = the clip's
        latent frames plus `num_world_steps` rolled out.

        `world_num_frames` `[B]` (from `TheWorldProcessor`) gives each row's real frame count when clips of
        several lengths are padded into one batch; each clip is encoded on its own frames and its latents come
        first in its row (zeros after).
        """
        if self.world_encoder is None:
            raise ValueError("this TheWorld has no world encoder (enable_world=False)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_cosmos_vae):
            latents, lengths = self.world_encoder.encode_clips(world_pixel_values, world_num_frames)
        if self.config.num_world_steps > 0:
            if int(lengths.min()) != latents.shape[2]:
                raise ValueError("a world rollout continues each clip from its last latent frame: batch clips of one "
                                 "length together when num_world_steps > 0")
            latents = self.roll_out(latents)
        return latents

    def roll_out(self, latents: torch.Tensor, steps: int | None = None, config: RolloutConfig | None = None) -> torch.Tensor:
        """The clip's latents `[B, C, T, h, w]` followed by `steps` (default `num_world_steps`) latent frames
        predicted by the Cosmos transformer (`config`: default `self.rollout_config`)."""
        if self.world_transformer is None:
            self.load_world_rollout_components()
        steps = self.config.num_world_steps if steps is None else steps
        config = config or self.rollout_config
        frozen = not any(p.requires_grad for p in self.world_transformer.parameters())
        if self.rollout_cache is not None and frozen:
            future = self._roll_out_cached(latents, steps, config)
        else:
            future = rollout_world_latents(self.world_transformer, self.world_scheduler, latents, steps, config=config,
                                           statistics=self.world_latent_statistics)[:, :, latents.shape[2]:]
        # The sampler leaves the observed frames at sigma_min noise: keep their exact (differentiable) latents.
        return torch.cat([latents, future.to(latents.dtype)], dim=2)

    def _roll_out_cached(self, latents: torch.Tensor, steps: int, config: RolloutConfig) -> torch.Tensor:
        """The future latent frames `[B, C, steps, h, w]` of each clip, from `rollout_cache` or rolled out.

        With the cache, a clip's rollout is a function of the clip alone, so that reusing it is exact: its
        noise is drawn from a generator seeded by the cache key (the clip's latents, the world model's
        weights and latent statistics, `steps` and every field of `config`, the seed included), not from
        one draw for the whole batch (which would give a clip other noise in another batch). The clips
        missing from the cache are rolled out together. A resumed run, whose cache starts empty, therefore
        rolls out what the uninterrupted run cached, as far as the transformer computes a row the same in
        any batch: on the tiny transformer on a CPU, batches of 1, 2, 3, 4 and 8 agree with 16 bit for bit
        (measured by hand); the VAE does not always (`LatentCache`), and a GPU kernel may not either, in
        the last bits. Rolling each miss out alone would remove that, at 3 to 60 times the first epoch's
        rollout time (the tiny model, 16 clips one by one against one batch, 2 steps, three runs on the
        shared 2 CPU cores: 3.3x, 6.8x, 63x)."""
        if self._world_model_digest is None:
            self._world_model_digest = module_digest(self.world_transformer, self.world_latent_statistics)
        context = self._world_model_digest + repr((steps, dataclasses.astuple(config))).encode()
        keys = [LatentCache.key(latents[row], context) for row in range(latents.shape[0])]
        rows = [self.rollout_cache.get(key) for key in keys]
        missing = [row for row, future in enumerate(rows) if future is None]
        if missing:
            shape = (latents.shape[1], latents.shape[2] + steps, *latents.shape[3:])
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                int.from_bytes(keys[row][:8], "little")), dtype=torch.float32) for row in missing])
            rolled = rollout_world_latents(self.world_transformer, self.world_scheduler, latents[missing], steps,
                                           config=config, noise=noise, statistics=self.world_latent_statistics)
            for k, row in enumerate(missing):
                # A copy: a view would keep the whole batch's rollout, observed frames included, alive in
                # the cache while it counts only the future frames' bytes against its bound.
                rows[row] = rolled[k, :, latents.shape[2]:].clone()
                self.rollout_cache.put(keys[row], rows[row])
        return torch.stack(rows)

    def world_latent_frames(self, world_num_frames: torch.Tensor) -> torch.Tensor:
        """Latent frames of each row's world (its clip's plus the rollout's) from its video frame counts."""
        return torch.tensor([latent_frames(int(n)) + self.config.num_world_steps for n in world_num_frames])

    def embed_world(self, world_pixel_values: torch.Tensor | None = None, world_latents: torch.Tensor | None = None,
                    world_num_frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """World-token embeddings from pixels or from precomputed latents: `(embeds, mask)`, `embeds`
        `[B, T * tokens_per_frame, hidden]` and `mask` True on each row's real tokens."""
        if world_latents is None:
            world_latents = self.encode_world(world_pixel_values, world_num_frames)
        lengths = None if world_num_frames is None else self.world_latent_frames(world_num_frames)
        return self.world_projector(world_latents, lengths)

    def _fused_embeddings(self, input_ids, pixel_values, world_embeds, world_mask) -> torch.Tensor:
        llm_input_ids = input_ids
        if self.config.image_token_id >= self.model.vocab_size:  # as Gemma 3: an out-of-table image id
            llm_input_ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
        inputs_embeds = self.get_input_embeddings()(llm_input_ids)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, return_dict=True).pooler_output
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                         image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
        placeholders = input_ids == self.config.world_token_index
        found, expected = placeholders.sum(dim=1), world_mask.sum(dim=1).to(placeholders.device)
        if not bool((found == expected).all()):
            raise ValueError(
                f"the rows hold {found.tolist()} world placeholders but their worlds have {expected.tolist()} tokens: "
                f"build inputs with TheWorldProcessor (model.processor) or TheWorldCollator, which expand each "
                f"sample's world block for its clip length"
            )
        # masked_scatter fills positions in row-major order: row b's placeholders get row b's real tokens.
        tokens = world_embeds[world_mask.to(world_embeds.device)]
        return inputs_embeds.masked_scatter(placeholders.unsqueeze(-1), tokens.to(inputs_embeds.dtype))

    # ------------------------------------------------------------------ forward and generate

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        world_pixel_values: torch.Tensor | None = None,
        world_latents: torch.Tensor | None = None,
        world_num_frames: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""Gemma 3's forward with world tokens.

        world_pixel_values (`torch.FloatTensor` of shape `[B, 3, F, H, W]`, *optional*):
            The world clip in `[-1, 1]`, `F = 1 + 4k` frames oldest first (an image is `F = 1`);
            `TheWorldProcessor` produces it.
        world_latents (`torch.FloatTensor` of shape `[B, 16, T, h, w]`, *optional*):
            Precomputed normalised Cosmos latents (e.g. from `encode_world` or a rollout) instead of
            `world_pixel_values`.
        world_num_frames (`torch.LongTensor` of shape `[B]`, *optional*):
            Each row's real clip length when clips of several lengths share the batch (the processor's
            `world_num_frames`); by default every row has all `F` frames.

        `input_ids` must carry each row's world placeholders, as `TheWorldProcessor` writes them.
        """
        gemma_inputs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            token_type_ids=token_type_ids, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        if world_pixel_values is None and world_latents is None:
            if input_ids is not None and self.config.world_token_index is not None and bool(
                (input_ids == self.config.world_token_index).any()
            ):
                raise ValueError("input_ids hold world placeholders but neither world_pixel_values nor world_latents was given")
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds,
                                   **gemma_inputs)
        if not self.config.enable_world:
            raise ValueError("world inputs were given to a TheWorld built with enable_world=False")
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("world fusion needs input_ids (and no inputs_embeds) to find the world positions")
        world_embeds, world_mask = self.embed_world(world_pixel_values, world_latents, world_num_frames)
        inputs_embeds = self._fused_embeddings(input_ids, pixel_values, world_embeds, world_mask)
        if gemma_inputs["labels"] is not None:
            gemma_inputs["labels"] = gemma_inputs["labels"].masked_fill(
                input_ids == self.config.world_token_index, IGNORE_INDEX)
        return super().forward(input_ids=None, pixel_values=None, inputs_embeds=inputs_embeds, **gemma_inputs)

    def prepare_inputs_for_generation(self, input_ids, use_cache=True, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, use_cache=use_cache, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and use_cache:
            # The world is in the KV cache after the prefill; later steps feed only new tokens.
            model_inputs["world_pixel_values"] = None
            model_inputs["world_latents"] = None
            model_inputs["world_num_frames"] = None
        return model_inputs

    def generate(self, input_ids=None, attention_mask=None, token_type_ids=None, world_pixel_values=None,
                 world_latents=None, world_num_frames=None, **kwargs):
        """`GenerationMixin.generate` with world tokens (KV cache or not, any batch size).

        Inputs come from `TheWorldCollator(model, for_generation=True)` (left padded, world blocks expanded);
        the returned sequences are `prompt + new tokens`.
        """
        if world_pixel_values is not None or world_latents is not None:
            kwargs.update(world_pixel_values=world_pixel_values, world_latents=world_latents,
                          world_num_frames=world_num_frames)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


AutoModel.register(TheWorldConfig, TheWorld)
AutoModelForImageTextToText.register(TheWorldConfig, TheWorld)


@torch.no_grad()
def text_embedding_rms(embeddings: torch.nn.Module) -> float:
    """RMS of Gemma's (scaled) text embeddings over the first 4,096 ids: the scale other tokens start at."""
    ids = torch.arange(min(embeddings.num_embeddings, 4096), device=embeddings.weight.device)
    return embeddings(ids).float().pow(2).mean().sqrt().item()


def _processor_class():
    """`TheWorldProcessor`, found in transformers' `AutoProcessor` registry where `theworld.processing_theworld`
    registers it: the model never imports the processor (transformers' layout: the model imports only its
    configuration), as no transformers model imports its processor."""
    try:
        return PROCESSOR_MAPPING[TheWorldConfig]
    except KeyError:
        raise RuntimeError(
            "TheWorldProcessor is not registered: use `from theworld import TheWorld` (which registers it), or "
            "`import theworld.processing_theworld` before TheWorld.from_pretrained"
        ) from None


def _base_id(name_or_path) -> str | None:
    """A hub id as given; a local directory as an absolute path, so a saved config works from any cwd."""
    if name_or_path is None:
        return None
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else str(name_or_path)


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}


__all__ = ["TheWorld", "TRAINABLE_WEIGHTS_NAME", "DEFAULT_LORA_TARGET_MODULES"]
