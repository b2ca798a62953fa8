"""The tiny models load through the same from_pretrained paths as the real repositories."""
import json
import subprocess
import sys

from theworld.tiny import build_tiny_models


def test_tiny_build_is_deterministic_and_reused(tiny_models, tmp_path):
    gemma_dir, cosmos_dir = tiny_models
    gemma_again, cosmos_again = build_tiny_models(tmp_path, seed=0)
    for a, b in ((gemma_dir, gemma_again), (cosmos_dir, cosmos_again)):
        for weights in sorted(a.rglob("*.safetensors")):
            assert weights.read_bytes() == (b / weights.relative_to(a)).read_bytes(), weights
    stamp = (gemma_again / "model.safetensors").stat().st_mtime_ns
    build_tiny_models(tmp_path, seed=0)
    assert (gemma_again / "model.safetensors").stat().st_mtime_ns == stamp, "complete build must be reused"


def test_tiny_gemma_has_real_gemma3_layout(tiny_models):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    gemma_dir, _ = tiny_models
    processor = AutoProcessor.from_pretrained(gemma_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir)
    tokenizer = processor.tokenizer
    # More embedding rows than tokenizer entries, like google/gemma-3-4b-it.
    assert model.get_input_embeddings().num_embeddings > len(tokenizer)
    for token in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\n<start_of_image>Hi?<end_of_turn>\n<start_of_turn>model\n"


def test_tiny_cosmos_loads_as_diffusers_pipeline_repo(tiny_models):
    _, cosmos_dir = tiny_models
    index = json.loads((cosmos_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2VideoToWorldPipeline"
    # The pipeline imports cosmos_guardrail (autograd off): only ever in a subprocess.
    code = f"""
import torch
from diffusers import Cosmos2VideoToWorldPipeline
class NoGuard(torch.nn.Module):  # the guard is the safety worker's business, not this layout check's
    pass
pipe = Cosmos2VideoToWorldPipeline.from_pretrained({str(cosmos_dir)!r}, safety_checker=NoGuard())
assert pipe.vae.config.z_dim == 16 and pipe.transformer.config.in_channels == 17
assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
