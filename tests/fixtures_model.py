"""Session fixtures for the model side (tiny Gemma 3 + tiny Cosmos)."""
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
