"""Real shapes without the weights: the published configurations as data, `theworld.tiny --real-shapes`,
and the real-shape training commands of `theworld.train` and `theworld.train_world` (cut down to the tiny
models in CI; in full under `pytest -m slow`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import REPO_ROOT, run_in_process
from theworld.real_configs import (
    COSMOS_TRANSFORMER_CONFIG, COSMOS_VAE_CONFIG, GEMMA_SPECIAL_TOKEN_IDS, GEMMA_TOKENIZER_PIECES, gemma_config,
    gemma_layer_types,
)

# The flags of the real-shape command (the fixed interface) other than the model directories.
REAL_SHAPE_FLAGS = ["--world-image-size", "480,640", "--world-tokens-per-side", "16", "--max-steps", "2",
                    "--batch-size", "1", "--eval-size", "2", "--lora-r", "8", "--gradient-checkpointing"]


# The flags of `theworld.train_world`'s real-shape command (issue 22) other than the model and output
# directories: LoRA on the real-shape transformer, every clip resized to 480x640 for the VAE, 2 steps. The
# rollout evaluation is skipped: its ridge baseline encodes 1024 training clips at the world size (hours of the
# full Wan VAE at 480x640 on the CPU).
WORLD_REAL_SHAPE_FLAGS = ["--world-image-size", "480,640", "--lora-r", "8", "--gradient-checkpointing", "--max-steps",
                          "2", "--batch-size", "1", "--synthetic-size", "8", "--synthetic-eval-size", "4", "--eval-size",
                          "2", "--rollout-eval-steps", ""]


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_configurations_give_the_published_parameter_counts():
    """Gemma 3 4B is 4.30 B parameters (0.42 B of them SigLIP + projector), the Cosmos-Predict2 2B
    transformer 1.96 B, the Wan 2.1 VAE 127 M: a typo in any width would change these."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from transformers import Gemma3ForConditionalGeneration

    with torch.device("meta"):
        gemma = Gemma3ForConditionalGeneration(gemma_config())
        assert numel(gemma) == 4_300_079_472
        assert numel(gemma.model.vision_tower) + numel(gemma.model.multi_modal_projector) == 419_816_304
        assert numel(CosmosTransformer3DModel(**COSMOS_TRANSFORMER_CONFIG)) == 1_956_413_440
        assert numel(AutoencoderKLWan(**COSMOS_VAE_CONFIG)) == 126_892_531


def test_a_cut_config_keeps_every_width_and_one_layer_of_each_attention_kind():
    full, cut = gemma_config(), gemma_config(2, 2)
    assert cut.text_config.num_hidden_layers == 2 and cut.vision_config.num_hidden_layers == 2
    assert cut.text_config.layer_types == ["sliding_attention", "full_attention"]
    for part in ("text_config", "vision_config"):
        a, b = getattr(full, part).to_dict(), getattr(cut, part).to_dict()
        assert {k: v for k, v in a.items() if k not in ("num_hidden_layers", "layer_types")} == \
               {k: v for k, v in b.items() if k not in ("num_hidden_layers", "layer_types")}
    assert gemma_layer_types(34).count("full_attention") == 5


def test_the_synthesised_tokenizer_has_gemmas_vocabulary_and_special_ids():
    from theworld.real_configs import GEMMA_IMAGE_SEQ_LENGTH
    from theworld.tiny import _gemma_processor, _real_gemma_vocab

    processor = _gemma_processor(_real_gemma_vocab(), 896, GEMMA_IMAGE_SEQ_LENGTH)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == GEMMA_TOKENIZER_PIECES + 1  # the pieces + <image_soft_token>
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL_TOKEN_IDS} == GEMMA_SPECIAL_TOKEN_IDS
    assert len(tokenizer) <= gemma_config().text_config.vocab_size  # the table is larger than the tokenizer
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Which way?"}]}],
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[:2] == [2, 105] and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_layers_needs_real_shapes():
    result = subprocess.run([sys.executable, "-m", "theworld.tiny", "out", "--layers", "3"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--layers needs --real-shapes" in result.stderr


def test_the_real_shape_command_runs_cut_down_to_the_tiny_models(tmp_path, tiny_models, tiny_safety_worker):
    """The real-shape command's flags, with the tiny models' world size (their latent grid is 8x8). In this
    process, against the session's worker: the flags are what is tested here (the command line itself, with a
    worker it spawns, is test_train.py's mission test and the README's blocks)."""
    flags = dict(zip(REAL_SHAPE_FLAGS[:4:2], REAL_SHAPE_FLAGS[1:4:2]))
    assert flags == {"--world-image-size": "480,640", "--world-tokens-per-side": "16"}
    cut = ["--world-image-size", "64,64", "--world-tokens-per-side", "4", *REAL_SHAPE_FLAGS[4:]]
    run_in_process(tmp_path, tiny_models, tiny_safety_worker.endpoint, *cut)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_samples"] == 2
    assert summary["lora_r"] == 8 and summary["gradient_checkpointing"] is True
    assert 0 < summary["peak_rss_mb"] < 24 * 1024
    assert (tmp_path / "model" / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def real_shape_models(tmp_path_factory):
    """`python -m theworld.tiny OUT --real-shapes` once for the module's slow tests (5 GB, a few minutes)."""
    out = tmp_path_factory.mktemp("real")
    subprocess.run([sys.executable, "-m", "theworld.tiny", str(out), "--real-shapes"], cwd=REPO_ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True)
    return out


def run_real_shape_command(module: str, *args: str) -> dict:
    """`python -m MODULE ARGS` (a real-shape command, --output-dir among ARGS) to the end; its summary.json."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((Path(args[args.index("--output-dir") + 1]) / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_real_shape_command_runs_on_cpu(tmp_path, real_shape_models):
    """The issue's command, as written, on models of the real shapes (2 layers deep): minutes on 2 cores."""
    out, run = real_shape_models, tmp_path / "run"
    summary = run_real_shape_command("theworld.train", "--gemma-model", str(out / "gemma"), "--cosmos-model",
                                     str(out / "cosmos"), *REAL_SHAPE_FLAGS, "--output-dir", str(run))
    assert summary["steps"] == 2 and summary["lora_r"] == 8 and summary["gradient_checkpointing"]
    assert summary["peak_rss_mb"] < 24 * 1024
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 2560 and config["text_config"]["vocab_size"] == 262208
    assert config["world_image_size"] == [480, 640]


def test_the_world_model_real_shape_command_runs_cut_down_to_the_tiny_models(tmp_path, tiny_models,
                                                                              tiny_safety_worker):
    """train_world's real-shape flags with a world size the tiny models take (48x64: 480x640's aspect), in this
    process against the session's worker: the clips are resized before the VAE, the LoRA adapters (and only
    they) train for 2 steps with the transformer's checkpointing on, and the peak memory is recorded."""
    from safetensors.torch import load_file

    from theworld.train_world import ARGUMENT_CLASSES, DESCRIPTION, train_world
    from theworld.training.arguments import parse_args

    assert WORLD_REAL_SHAPE_FLAGS[:2] == ["--world-image-size", "480,640"]
    cut = ["--world-image-size", "48,64", *WORLD_REAL_SHAPE_FLAGS[2:]]
    summary = train_world(*parse_args(
        ["--cosmos-model", str(tiny_models[1]), *cut, "--output-dir", str(tmp_path), "--report-to", "none",
         "--safety-endpoint", tiny_safety_worker.endpoint], ARGUMENT_CLASSES, DESCRIPTION))
    assert summary["steps"] == 2 and summary["trained"] == 2 and summary["accounting_holds"]
    assert summary["lora_r"] == 8 and summary["gradient_checkpointing"] is True
    # The task's clips are 32x32; the VAE saw them at 48x64 (downsampled by 8): 3 latent frames of 6x8.
    assert summary["world_image_size"] == [48, 64] and summary["world_latent_shape"] == [16, 3, 6, 8]
    assert 0 < summary["peak_rss_mb"] < 24 * 1024 and "peak_cuda_mb" in summary
    assert summary["rollout_eval"] is None
    adapters = load_file(tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    assert sum(t.numel() for t in adapters.values()) == summary["trainable_parameters"]
    # lora_B starts at zero: a nonzero one moved.
    assert any(t.abs().sum() > 0 for name, t in adapters.items() if "lora_B" in name)
    task = json.loads((tmp_path / "model" / "theworld_task.json").read_text())
    assert task["world_image_size"] == [48, 64] and task["image_size"] == 32


def test_a_bad_world_image_size_is_refused_before_anything_is_built(tmp_path):
    from theworld.train_world import ARGUMENT_CLASSES, DESCRIPTION, train_world
    from theworld.training.arguments import parse_args

    with pytest.raises(ValueError, match=r"--world-image-size must be 'H,W', both positive multiples of 16"):
        train_world(*parse_args(["--world-image-size", "480,650", "--output-dir", str(tmp_path / "run")],
                                ARGUMENT_CLASSES, DESCRIPTION))
    assert not (tmp_path / "run").exists()


def test_the_rollout_evaluation_encodes_at_the_size_the_model_trained_at(tiny_models):
    """A model trained with --world-image-size is evaluated at that size (its task record says it), not at the
    task's own."""
    from diffusers import CosmosTransformer3DModel

    from theworld.evaluation_world import evaluate_world_model
    from theworld.modeling.world_encoder import CosmosWorldEncoder

    cosmos = str(tiny_models[1])
    transformer = CosmosTransformer3DModel.from_pretrained(cosmos, subfolder="transformer").eval()
    encoder = CosmosWorldEncoder.from_pretrained(cosmos).eval()
    sizes = set()
    encoder.register_forward_pre_hook(lambda _, args: sizes.add(tuple(args[0].shape[-2:])))
    record = {"data": "synthetic", "seed": 0, "image_size": 32, "num_frames": 9, "world_image_size": [48, 64]}
    table = evaluate_world_model(transformer, encoder, record, eval_size=2, train_size=4, steps=(1,))
    assert sizes == {(48, 64)} and table["rollout_eval"]["1"]["n"] == 2


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_the_world_model_real_shape_command_runs_on_cpu(tmp_path, real_shape_models):
    """train_world's real-shape command, as docs/world_model.md writes it, on the real-shape Cosmos (the
    2048-wide transformer 2 blocks deep, the full Wan VAE): 11 CPU minutes, 43 wall minutes on 2 shared cores."""
    run = tmp_path / "run"
    summary = run_real_shape_command("theworld.train_world", "--cosmos-model", str(real_shape_models / "cosmos"),
                                     *WORLD_REAL_SHAPE_FLAGS, "--output-dir", str(run))
    assert summary["steps"] == 2 and summary["lora_r"] == 8 and summary["gradient_checkpointing"]
    assert summary["world_latent_shape"] == [16, 3, 60, 80]  # 480x640 / 8, 9 frames -> 3 latent frames
    assert summary["peak_rss_mb"] < 24 * 1024
    config = json.loads((run / "model" / "transformer" / "config.json").read_text())
    assert config["num_attention_heads"] * config["attention_head_dim"] == 2048


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_bench_memory_counts_every_rank_from_the_real_configurations(tmp_path):
    """`scripts/bench_memory.py --skip-activations`: exact bytes on the meta device, no weights."""
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, "scripts/bench_memory.py", "--skip-activations", "--json", str(out)],
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    counts, ranks = figures["counts"], figures["ranks"]
    assert counts["gemma_language"] + counts["gemma_vision"] == 4_300_079_472
    assert 27_000_000 < counts["retinaface"] < 28_000_000  # ResNet-50 + FPN + SSH + heads
    lora = ranks["TheWorld trainer, LoRA"]
    assert lora["frozen_weights"] == 2 * (4_300_079_472 + counts["cosmos_vae"])
    assert lora["trainable_state"] == 16 * (counts["lora"] + counts["world_projector"])
    pipeline = ranks["rank importing the pipeline, LoRA"]
    assert pipeline["frozen_weights"] - lora["frozen_weights"] == 2 * (
        counts["cosmos_transformer"] + counts["t5_encoder"] + counts["qwen3guard"] + counts["retinaface"])
    assert "weights + state: a rank importing the pipeline holds 2.62x" in result.stdout
