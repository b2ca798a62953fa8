"""Test-wide settings: offline, single-threaded, deterministic.

Expensive fixtures live in per-area plugin modules (one owner each) and are shared by the whole
session: tiny models are built once, one safety worker serves many tests.
"""
import os

# Offline before anything imports huggingface_hub / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    "fixtures_model",
    "fixtures_worker",
]

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
