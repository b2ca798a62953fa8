"""Test-wide settings: offline, deterministic, and this process single-threaded.

Only what the tests cannot run without goes into the environment that every subprocess inherits (the
README's commands, spawned workers, trainers): offline mode. Thread counts, trackers and safety windows
stay the programs' own defaults there, so that the tests run what users run.

Expensive fixtures live in per-area plugin modules (one owner each) and are shared by the whole
session: tiny models are built once, one safety worker serves many tests.
"""
import os

# Offline before anything imports huggingface_hub / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "fixtures_model",
    "fixtures_worker",
]

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)  # this process only: in-process models stay fast and deterministic beside the workers
torch.use_deterministic_algorithms(True, warn_only=True)
