"""TheWorld: fusion, labels, generation, freezing, gradients, save/load, on the tiny models."""
import numpy as np
import pytest
import torch
from fixtures_model import load_tiny_world, make_sample
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor, Gemma3ForConditionalGeneration

from theworld import TheWorld, TheWorldCollator, TheWorldConfig
from theworld.modeling.modeling_theworld import TRAINABLE_WEIGHTS_NAME

QUESTIONS = [("What is here?", "A cat."), ("Which color is the ball on the left?", "Red."),
             ("Count them.", "There are three small boxes.")]


def samples(n=3):
    return [make_sample(i, *QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def manual_loss(logits, labels):
    shift_logits, shift_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return torch.nn.functional.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)


# ---------------------------------------------------------------- tokens and config

def test_world_tokens_are_added_without_shrinking_the_embedding_table(tiny_models, tiny_world_model):
    gemma_dir, _ = tiny_models
    base = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir)
    model = tiny_world_model
    rows = model.get_input_embeddings().num_embeddings
    assert rows == base.get_input_embeddings().num_embeddings  # tiny Gemma, like the real one, has spare rows
    tokenizer = model.processor.tokenizer
    for name in ("sow_token", "eow_token", "world_token"):
        token = getattr(model.config, name)
        token_id = getattr(model.config, f"{name}_index")
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
        assert token_id < rows
    # 32x32 world image -> 4x4 latent, one token per position of each latent frame (9 frames -> 3).
    assert model.processor.num_world_tokens(1) == 16 and model.processor.num_world_tokens(9) == 48


def test_embedding_table_grows_when_tokenizer_outgrows_it(tiny_models, tmp_path):
    gemma_dir, cosmos_dir = tiny_models
    base = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir)
    processor = AutoProcessor.from_pretrained(gemma_dir)
    vocab = len(processor.tokenizer)
    base.resize_token_embeddings(vocab)  # no spare rows left
    base.save_pretrained(tmp_path / "gemma")
    processor.save_pretrained(tmp_path / "gemma")
    model = TheWorld.from_pretrained(tmp_path / "gemma", cosmos_model=cosmos_dir)
    assert model.get_input_embeddings().num_embeddings == vocab + 3
    again = TheWorld.from_pretrained(tmp_path / "gemma", cosmos_model=cosmos_dir)
    assert torch.equal(model.get_input_embeddings().weight, again.get_input_embeddings().weight)


def test_config_is_registered_with_auto_classes(tiny_world_model, tmp_path):
    tiny_world_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TheWorldConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), TheWorld)


def test_missing_cosmos_model_names_the_fix(tiny_models):
    gemma_dir, _ = tiny_models
    with pytest.raises(ValueError, match="cosmos_model="):
        TheWorld.from_pretrained(gemma_dir)


# ---------------------------------------------------------------- enable_world=False

def test_enable_world_false_gives_exactly_gemma3_logits(tiny_models):
    gemma_dir, _ = tiny_models
    gemma = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir).eval()
    plain = TheWorld.from_pretrained(gemma_dir, enable_world=False).eval()
    assert plain.world_encoder is None and plain.world_projector is None and not plain.processor.enable_world
    batch = TheWorldCollator(plain)(samples())
    assert "world_pixel_values" not in batch
    with torch.no_grad():
        expected = gemma(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got = plain(**batch).logits
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- fusion

@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_each_row_of_a_mixed_length_batch_equals_that_row_alone(tiny_world_model, padding_side):
    model = tiny_world_model
    collate = TheWorldCollator(model, padding_side=padding_side)
    rows = samples(3)
    batch = collate(rows)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3  # really mixed lengths
    with torch.no_grad():
        batched = model(**batch)
        for i, row in enumerate(rows):
            alone_batch = collate([row])
            alone = model(**alone_batch)
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(batched.logits[i][real], alone.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batch["labels"][i][real], alone_batch["labels"][0])


def test_world_tokens_change_the_prediction(tiny_world_model):
    model = tiny_world_model
    batch = TheWorldCollator(model)(samples(2))
    with torch.no_grad():
        logits = model(**batch).logits
        swapped = model(**{**batch, "world_pixel_values": batch["world_pixel_values"].flip(0)}).logits
        latents = model.encode_world(batch["world_pixel_values"])
        from_latents = model(**{k: v for k, v in batch.items() if k != "world_pixel_values"},
                             world_latents=latents).logits
    world_start = int((batch["input_ids"][0] == model.config.world_token_index).nonzero()[0])
    assert torch.equal(logits[:, :world_start], swapped[:, :world_start])  # causal: before the world, no change
    assert not torch.allclose(logits[:, -5:], swapped[:, -5:])
    assert torch.equal(logits, from_latents)


def clip_sample(index: int, num_frames: int, question: str = "Which way does it move?", answer: str = "left"):
    """A sample whose images are a clip of `num_frames` random 32x32 frames."""
    rng = np.random.default_rng(100 + index)
    sample = make_sample(index, question, answer)
    return {**sample, "images": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(num_frames)]}


def test_a_clip_feeds_every_frame_to_the_world_and_its_last_to_gemma(tiny_world_model):
    model = tiny_world_model
    clip = clip_sample(0, 9)
    batch = TheWorldCollator(model)([clip])
    assert batch["world_pixel_values"].shape == (1, 3, 9, 32, 32)
    assert int((batch["input_ids"] == model.config.world_token_index).sum()) == 48  # 3 latent frames x 16
    last_only = TheWorldCollator(model)([{**clip, "images": clip["images"][-1:]}])
    torch.testing.assert_close(batch["pixel_values"], last_only["pixel_values"], rtol=0, atol=0)
    earlier = {**clip, "images": [np.zeros_like(clip["images"][0])] * 8 + clip["images"][-1:]}
    with torch.no_grad():
        changed = model(**TheWorldCollator(model)([earlier])).logits[0, -3:]
        assert not torch.allclose(model(**batch).logits[0, -3:], changed)  # earlier frames reach the answer


@pytest.mark.parametrize("num_frames", [2, 4, 6, 8])
def test_clip_lengths_other_than_1_plus_4k_are_refused_with_the_valid_counts(tiny_world_model, num_frames):
    with pytest.raises(ValueError, match=r"1 \+ 4k frames \(1, 5, 9"):
        TheWorldCollator(tiny_world_model)([clip_sample(0, num_frames)])


def test_each_row_of_a_batch_of_mixed_clip_lengths_equals_that_row_alone(tiny_world_model):
    """Clips of 9, 1 and 5 frames in one batch (padded clips, different world-token counts per row)."""
    model = tiny_world_model
    collate = TheWorldCollator(model)
    batch, _ = assert_mixed_clip_rows_equal_each_row_alone(model, collate)
    assert batch["world_num_frames"].tolist() == [9, 1, 5]
    counts = (batch["input_ids"] == model.config.world_token_index).sum(dim=1).tolist()
    assert counts == [48, 16, 32]


def assert_mixed_clip_rows_equal_each_row_alone(model, collate):
    """Clips of 9, 1 and 5 frames collated together: each row's logits equal the row collated alone.
    Returns the batch and its logits."""
    rows = [clip_sample(0, 9), clip_sample(1, 1), clip_sample(2, 5)]
    batch = collate(rows)
    with torch.no_grad():
        batched = model(**batch)
        for i, row in enumerate(rows):
            alone = model(**collate([row]))
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(batched.logits[i][real], alone.logits[0], rtol=1e-4, atol=1e-4)
    return batch, batched.logits


def test_frame_tokens_of_mixed_clip_lengths_equal_each_row_alone_and_survive_a_reload(tiny_models, tmp_path):
    """The 'frame' projection (the trainer's default on the tiny models): `world_frame_tokens` per latent
    frame, padding frames never leak into real ones, and the saved model rebuilds the same projector."""
    model = load_tiny_world(tiny_models, world_projection="frame", world_frame_tokens=5).eval()
    batch, logits = assert_mixed_clip_rows_equal_each_row_alone(model, TheWorldCollator(model))
    counts = (batch["input_ids"] == model.config.world_token_index).sum(dim=1).tolist()
    assert counts == [15, 5, 10]  # 3, 1 and 2 latent frames
    model.save_pretrained(tmp_path)
    reloaded = TheWorld.from_pretrained(tmp_path).eval()
    assert (reloaded.config.world_projection, reloaded.config.world_frame_tokens) == ("frame", 5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)


def test_frame_tokens_see_the_order_of_latent_frames(tiny_models):
    """Each frame's tokens read its change since the previous latent frame: swapping two latent frames
    changes the tokens of every frame whose predecessor changed, not just their order."""
    model = load_tiny_world(tiny_models, world_projection="frame", world_frame_tokens=2).eval()
    torch.manual_seed(0)
    latents = torch.randn(1, model.config.world_latent_channels, 3, 4, 4)
    swapped = latents[:, :, [1, 0, 2]]
    with torch.no_grad():
        tokens, _ = model.world_projector(latents)
        tokens_swapped, _ = model.world_projector(swapped)
    per_frame, per_frame_swapped = tokens.view(3, 2, -1), tokens_swapped.view(3, 2, -1)
    # The last frame is the same in both; only its predecessor differs.
    assert not torch.allclose(per_frame[2], per_frame_swapped[2])


def test_the_processor_is_saved_with_the_model_and_expands_the_world_block(tiny_world_model, tmp_path):
    from theworld.processing_theworld import TheWorldProcessor

    tiny_world_model.save_pretrained(tmp_path)
    processor = TheWorldProcessor.from_pretrained(tmp_path)
    assert processor.world_tokens_per_frame == 16 and processor.world_image_size == [32, 32]
    text = processor.render(make_sample(0)["messages"], num_frames=5, add_generation_prompt=False)
    assert text.count(tiny_world_model.config.world_token) == 32
    assert TheWorld.from_pretrained(tmp_path).processor.to_dict() == tiny_world_model.processor.to_dict()


# ---------------------------------------------------------------- labels

def test_labels_cover_only_the_answer(tiny_world_model):
    model = tiny_world_model
    rows = samples(3)
    batch = TheWorldCollator(model)(rows)
    tokenizer = model.processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labelled) == row["messages"][-1]["content"][0]["text"] + "<end_of_turn>"
    assert (batch["labels"][batch["input_ids"] == model.config.world_token_index] == -100).all()


def test_a_training_batch_preprocesses_its_clips_for_the_vae_once(tiny_world_model, monkeypatch):
    import theworld.processing_theworld as processing

    calls, real = [], processing.preprocess_world_clips
    monkeypatch.setattr(processing, "preprocess_world_clips", lambda clips, h, w: calls.append(len(clips)) or real(clips, h, w))
    rows, collate = samples(3), TheWorldCollator(tiny_world_model)
    batch = collate(rows)
    assert "world_pixel_values" in batch and calls == [3]  # not again for the prompt-only encoding
    # The prompt's token ids (where the answer starts) are the same without its clips' VAE input.
    clips, prompts = [list(r["images"]) for r in rows], [r["messages"][:-1] for r in rows]
    assert (collate._encode(prompts, clips, True, world_pixels=False)["input_ids"]
            == collate._encode(prompts, clips, True)["input_ids"])
    # world_pixels=False (evaluation passes that reuse latents): everything else as before, no preprocessing.
    calls.clear()
    tokens_only = TheWorldCollator(tiny_world_model, world_pixels=False)(rows)
    assert calls == [] and tokens_only.keys() == batch.keys() - {"world_pixel_values"}
    assert all(torch.equal(tokens_only[k], batch[k]) for k in tokens_only)
    with torch.no_grad():
        latents = tiny_world_model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
        assert torch.equal(tiny_world_model(**tokens_only, world_latents=latents).logits, tiny_world_model(**batch).logits)


def test_loss_counts_only_the_collators_labelled_tokens(tiny_world_model):
    model = tiny_world_model
    batch = TheWorldCollator(model)(samples(3))
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.loss, manual_loss(out.logits, batch["labels"]))
    # Labelling every token (world placeholders included) still never makes the world a target.
    everything = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out_all = model(**{**batch, "labels": everything})
    expected = manual_loss(out_all.logits, everything.masked_fill(
        batch["input_ids"] == model.config.world_token_index, -100))
    torch.testing.assert_close(out_all.loss, expected)
    assert not torch.allclose(out_all.loss, out.loss)


def test_generation_collator_ends_with_the_generation_prompt(tiny_world_model):
    model = tiny_world_model
    batch = TheWorldCollator(model, for_generation=True)(samples(3))
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    tokenizer = model.processor.tokenizer
    for row in batch["input_ids"]:
        assert tokenizer.decode(row).endswith("<start_of_turn>model\n")


# ---------------------------------------------------------------- generate

def test_generate_with_world_tokens_with_and_without_cache_batch_of_two(tiny_world_model):
    model = tiny_world_model
    rows = samples(2)
    collate = TheWorldCollator(model, for_generation=True)
    batch = collate(rows)
    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **settings)
        uncached = model.generate(**batch, use_cache=False, **settings)
        alone = [model.generate(**collate([row]), **settings) for row in rows]
    prompt = batch["input_ids"].shape[1]
    assert cached.shape == (2, prompt + 6)
    assert torch.equal(cached[:, :prompt], batch["input_ids"])
    assert torch.equal(cached, uncached)
    for i in range(2):
        assert torch.equal(cached[i, prompt:], alone[i][0, -6:])
    # The world is really read during generation: another world image changes the first logits.
    with torch.no_grad():
        scores = model.generate(**batch, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                do_sample=False).scores[0]
        swapped = model.generate(**{**batch, "world_pixel_values": batch["world_pixel_values"].flip(0)},
                                 max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                 do_sample=False).scores[0]
    assert not torch.allclose(scores, swapped)


# ---------------------------------------------------------------- training

def test_gradients_reach_the_projector_and_a_step_changes_it(tiny_models):
    model = load_tiny_world(tiny_models).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("world_projector.") for n in trainable)
    assert model.world_projector.proj[0].weight.dtype == torch.float32
    batch = TheWorldCollator(model)(samples(2))
    loss = model(**batch).loss
    assert loss.requires_grad
    loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name


def test_unfrozen_vae_encoder_learns_and_its_decoder_does_not(tiny_models):
    model = load_tiny_world(tiny_models, freeze_cosmos_vae=False).train()
    vae = model.world_encoder.vae
    assert not any(p.requires_grad for p in vae.decoder.parameters())
    batch = TheWorldCollator(model)(samples(2))
    model(**batch).loss.backward()
    encoder_params = [p for p in vae.encoder.parameters()]
    assert all(p.requires_grad for p in encoder_params)
    assert sum(float(p.grad.abs().sum()) for p in encoder_params if p.grad is not None) > 0
    assert all(p.grad is None for p in vae.decoder.parameters())
    before = [p.detach().clone() for p in encoder_params]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert any(not torch.equal(p, b) for p, b in zip(encoder_params, before))


def test_freezing_flags_select_the_trainable_parts(tiny_models):
    model = load_tiny_world(tiny_models, freeze_gemma_vision=False, freeze_gemma_language=False)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.vision_tower", "model.multi_modal_projector", "model.language_model"} <= trainable
    assert not any(n.startswith("world_encoder.") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("options", [
    dict(world_projection="spatial", world_projector_type="linear", world_tokens_per_side=2),
    dict(world_projection="channel", world_projector_type="mlp"),
    dict(world_projection="frame", world_frame_tokens=3, world_projector_type="mlp"),
])
def test_projection_modes_train(tiny_models, options):
    model = load_tiny_world(tiny_models, **options).train()
    expected_tokens = {"spatial": 4, "channel": 16, "frame": 3}[options["world_projection"]]
    assert model.processor.num_world_tokens(1) == expected_tokens
    batch = TheWorldCollator(model)(samples(2))
    assert int((batch["input_ids"][0] == model.config.world_token_index).sum()) == expected_tokens
    model(**batch).loss.backward()
    assert model.world_projector.proj[0].weight.grad.abs().sum() > 0


def test_the_frame_projection_whitens_each_latent_frame_with_running_statistics():
    from theworld.modeling.projector import LatentWhitener, WorldProjector

    torch.manual_seed(0)
    mixing = torch.randn(8, 8) * torch.logspace(-1, 1, 8)  # correlated, unequal variances
    latents = (torch.randn(2000, 8) @ mixing).view(2000, 2, 1, 2, 2).expand(2000, 2, 3, 2, 2).contiguous()
    mask = torch.ones(2000, 3, dtype=torch.bool)
    mask[:, 2] = False  # frame index 2 never seen: passes through unchanged
    whitener = LatentWhitener(2, 3, (2, 2), eps=1e-9)
    for start in range(0, 2000, 100):
        whitener.update(latents[start:start + 100], mask[start:start + 100])
    out = whitener(latents)
    assert torch.allclose(torch.cov(out[:, :, 0].flatten(1).T), torch.eye(8), atol=1e-2)
    assert torch.equal(out[:, :, 2], latents[:, :, 2])
    # The matrices are reused while the statistics stay, and follow them when they change or are loaded.
    assert whitener._whitening is not None and torch.equal(whitener(latents), out)
    other = LatentWhitener(2, 3, (2, 2), eps=1e-9)
    other.update(latents[:100] * 3, mask[:100])
    whitener.load_state_dict(other.state_dict())
    assert torch.equal(whitener(latents), other(latents)) and not torch.allclose(whitener(latents), out)
    whitener.update(latents[:100], mask[:100])
    assert not torch.equal(whitener(latents), other(latents))
    assert isinstance(WorldProjector(16, (4, 4), 64, max_frames=3, projection="frame").standardizer, LatentWhitener)
    WorldProjector(16, (8, 8), 64, projection="frame")  # 1024 values per frame: the most it whitens
    with pytest.raises(ValueError, match="world_tokens_per_side"):
        WorldProjector(16, (16, 16), 64, projection="frame")  # a 128x128 world image: 8.7 s per step in eigh



def test_the_mlp_projector_is_never_narrower_than_its_input():
    """A hidden layer narrower than the `frame` input is a bottleneck that lost the motion on seed 6
    (docs/training.md, "Every seed"); where the language model is wider than the input, it sets the width."""
    from theworld.modeling.projector import WorldProjector

    frame = WorldProjector(16, (4, 4), 64, max_frames=3, projection="frame", frame_tokens=4)
    assert [layer.weight.shape for layer in frame.proj[::2]] == [(512, 512), (256, 512)]  # 2 x 16 x 4 x 4 values in
    spatial = WorldProjector(16, (4, 4), 64, projection="spatial")
    assert [layer.weight.shape for layer in spatial.proj[::2]] == [(64, 16), (64, 64)]

def test_projector_stays_float32_in_a_bfloat16_model(tiny_models):
    model = load_tiny_world(tiny_models, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.world_projector.parameters())
    batch = TheWorldCollator(model)(samples(1))
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_mixed_precision_comes_from_autocast_with_float32_master_weights(tiny_models):
    model = load_tiny_world(tiny_models).train()
    batch = TheWorldCollator(model)(samples(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    for param in model.world_projector.parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
    assert model.world_projector.proj[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- save / load

def test_save_pretrained_round_trip_reproduces_logits(tiny_models, tmp_path):
    model = load_tiny_world(tiny_models, freeze_cosmos_vae=False).train()
    batch = TheWorldCollator(model)(samples(2))
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / TRAINABLE_WEIGHTS_NAME)
    assert {n.split(".")[0] for n in saved} == {"world_projector", "world_encoder"}
    assert not any(".decoder." in n for n in saved)  # the VAE decoder is never saved
    assert not any(n.startswith(("model.", "lm_head")) for n in saved)  # frozen Gemma is rebuilt from its id

    reloaded = TheWorld.from_pretrained(tmp_path).eval()
    assert reloaded.config.cosmos_model_name_or_path == model.config.cosmos_model_name_or_path
    assert not reloaded.config.freeze_cosmos_vae
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    with pytest.raises(ValueError, match="fixed by the saved TheWorld config"):
        TheWorld.from_pretrained(tmp_path, world_projection="channel")


# ---------------------------------------------------------------- world rollout hook

def test_world_rollout_adds_predicted_frames_as_world_tokens(tiny_models):
    from theworld.modeling.rollout import RolloutConfig

    model = load_tiny_world(tiny_models, num_world_steps=1).train()
    model.rollout_config = RolloutConfig(num_inference_steps=2)
    assert model.world_transformer is not None and not any(
        p.requires_grad for p in model.world_transformer.parameters())
    assert model.processor.num_world_tokens(1) == 2 * 16  # observed frame + one predicted latent frame
    batch = TheWorldCollator(model)(samples(2))
    latents = model.encode_world(batch["world_pixel_values"])
    assert latents.shape == (2, 16, 2, 4, 4)
    model(**batch).loss.backward()
    # Frames are told apart by the temporal embedding, which learns too.
    assert model.world_projector.temporal_embedding.grad[1].abs().sum() > 0


# ---------------------------------------------------------------- errors that name the fix

def test_inconsistent_world_inputs_are_refused(tiny_models, tiny_world_model):
    batch = TheWorldCollator(tiny_world_model)(samples(2))
    with pytest.raises(ValueError, match="neither world_pixel_values nor world_latents"):
        tiny_world_model(**{k: v for k, v in batch.items() if k != "world_pixel_values"})
    plain = TheWorld.from_pretrained(tiny_models[0], enable_world=False)
    with pytest.raises(ValueError, match="enable_world=False"):
        plain(**batch)
    no_pair = {**batch, "input_ids": batch["input_ids"].masked_fill(
        batch["input_ids"] == tiny_world_model.config.world_token_index, 0)}
    with pytest.raises(ValueError, match="world placeholders but their worlds have .* TheWorldProcessor"):
        tiny_world_model(**no_pair)


def test_world_model_without_world_inputs_is_its_base_gemma(tiny_models, tiny_world_model):
    """The trainer's no-world evaluation: the same model, fed a batch collated without the world."""
    batch = TheWorldCollator(tiny_world_model, world=False)(samples(2))
    assert "world_pixel_values" not in batch
    assert not (batch["input_ids"] == tiny_world_model.config.sow_token_index).any()
    gemma = Gemma3ForConditionalGeneration.from_pretrained(tiny_models[0]).eval()
    with torch.no_grad():
        assert torch.equal(tiny_world_model(**batch).logits,
                           gemma(**{k: v for k, v in batch.items() if k != "labels"}).logits)


def test_a_frozen_vae_encodes_a_clip_once_and_the_cache_returns_the_same_latents(tiny_models):
    from theworld.modeling.world_encoder import LatentCache

    model = load_tiny_world(tiny_models).eval()
    batch = TheWorldCollator(model)([clip_sample(0, 9), clip_sample(1, 5)])
    with torch.no_grad():
        uncached = model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
        model.world_encoder.cache = cache = LatentCache()
        first = model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
        again = model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
    assert torch.equal(first, uncached) and torch.equal(again, uncached)
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    trainable = load_tiny_world(tiny_models, freeze_cosmos_vae=False)
    trainable.world_encoder.cache = LatentCache()
    trainable.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
    assert len(trainable.world_encoder.cache) == 0  # a VAE that learns is always run
