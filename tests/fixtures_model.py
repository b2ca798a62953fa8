"""Session fixtures for the model side (tiny Gemma 3 + tiny Cosmos)."""
import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``(gemma_dir, cosmos_dir)``: the project's tiny Gemma 3 and Cosmos-Predict2, built once per session.

    The Cosmos directory is a full diffusers repository (``Cosmos2VideoToWorldPipeline.from_pretrained``
    loads it) without a ``safety_checker`` entry: a pipeline loaded from it in a subprocess needs
    ``safety_checker=...`` passed explicitly, exactly like the real nvidia repository offline.
    """
    from theworld.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def tiny_world_model(tiny_models):
    """A TheWorld on the tiny models (16 world tokens per sample), in eval mode. Shared: do not modify it;
    tests that train build their own with ``load_tiny_world``."""
    return load_tiny_world(tiny_models).eval()


def load_tiny_world(tiny_models, seed: int = 0, **options):
    """A fresh TheWorld on the tiny models; ``seed`` fixes the projector's initialisation."""
    import torch

    from theworld import TheWorld

    gemma_dir, cosmos_dir = tiny_models
    torch.manual_seed(seed)
    return TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir, **options)


def make_sample(index: int, question: str = "What is here?", answer: str = "A cat.", size=(40, 52)):
    """A sample in the training data format with a deterministic random image."""
    rng = np.random.default_rng(index)
    return {
        "id": f"sample-{index}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [rng.integers(0, 256, (*size, 3), dtype=np.uint8)],
    }


@pytest.fixture(scope="session")
def trained_default_model(tmp_path_factory):
    """The `model/` directory of `python -m theworld.train --output-dir <tmp>`: the README's default training
    run as written (tiny models, the motion task, a spawned tiny worker; minutes on 2 CPU cores), run once per
    session. For `long` tests only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    output_dir = tmp_path_factory.mktemp("trained_default") / "run"
    done = subprocess.run([sys.executable, "-m", "theworld.train", "--output-dir", str(output_dir)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output_dir / "model"
