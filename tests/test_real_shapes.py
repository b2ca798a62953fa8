"""Real shapes without the weights: the published configurations as data, `theworld.tiny --real-shapes`,
and the real-shape training command (cut down to the tiny models in CI; in full under `pytest -m slow`)."""
import json
import os
import subprocess
import sys

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


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_real_shape_command_runs_on_cpu(tmp_path):
    """The issue's command, as written, on models of the real shapes (2 layers deep): minutes on 2 cores."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "real"
    subprocess.run([sys.executable, "-m", "theworld.tiny", str(out), "--real-shapes"], cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "theworld.train", "--gemma-model", str(out / "gemma"), "--cosmos-model",
         str(out / "cosmos"), *REAL_SHAPE_FLAGS, "--output-dir", str(run)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["lora_r"] == 8 and summary["gradient_checkpointing"]
    assert summary["peak_rss_mb"] < 24 * 1024
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 2560 and config["text_config"]["vocab_size"] == 262208
    assert config["world_image_size"] == [480, 640]


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
