"""The tiny models load through the same from_pretrained paths as the real repositories."""
import json

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


def test_tiny_cosmos_has_the_video2world_repo_layout(tiny_models):
    # The diffusers pipeline itself loads this directory in tests/test_model_parity.py (in a subprocess).
    _, cosmos_dir = tiny_models
    index = json.loads((cosmos_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2VideoToWorldPipeline"
    for component in ("vae", "transformer", "scheduler", "text_encoder", "tokenizer"):
        assert component in index and (cosmos_dir / component).is_dir(), component
    assert "safety_checker" not in index  # the guard lives in the safety worker
