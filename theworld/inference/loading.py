"""Loading TheWorld: the one loader (`generate`, `serve`, evaluation scripts, and the trainer when it
continues a saved model all call it) and the one rule for "is this a saved TheWorld"."""
from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "theworld-tiny"  # what `serve` calls the tiny default in /v1/models


def is_saved_theworld(path: str | Path) -> bool:
    """True for a directory written by `TheWorld.save_pretrained` (e.g. a training run's `model/`)."""
    from theworld.configuration_theworld import saved_theworld_config

    return saved_theworld_config(path) is not None


def load_model(model: str | Path | None = None, cosmos: str | None = None, *, num_world_steps: int | None = None,
               init_seed: int | None = None, **options):
    """A `TheWorld`, on the CPU, in the mode `from_pretrained` leaves it (the caller moves it and sets eval).

    Args:
        model: a saved TheWorld directory (`runs/theworld/model` after `python -m theworld.train`), or a base
            Gemma 3 id or directory (then `cosmos` is needed for a world model); None: the tiny models,
            built offline on first use.
        cosmos: a Cosmos-Predict2 Video2World id or directory (a saved TheWorld remembers its own; given,
            it replaces that one).
        num_world_steps: latent frames of world rollout. A saved TheWorld's projector has one temporal
            embedding per frame of the rollout it was trained with: any other value is refused, None keeps it.
            For a base model None means 0.
        init_seed: seeds what loading initialises at random (a base model's world projector), without touching
            the caller's random state: processes that load the same model with it hold the same weights (the
            server's Ray Serve replicas answer alike). None: the process's random state.
        options: other `TheWorldConfig` options for `TheWorld.from_pretrained` (on a saved TheWorld only
            those it lets change on reload, e.g. the freeze flags).
    """
    if init_seed is not None:
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            return load_model(model, cosmos, num_world_steps=num_world_steps, **options)
    from theworld import TheWorld
    from theworld.configuration_theworld import saved_theworld_config

    if model is None:
        from theworld.tiny import build_tiny_models, default_tiny_dir

        gemma_dir, cosmos_dir = build_tiny_models(default_tiny_dir())
        model, cosmos = str(gemma_dir), cosmos or str(cosmos_dir)
    saved = saved_theworld_config(model)
    if saved is not None:
        if num_world_steps is not None and num_world_steps != saved.num_world_steps:
            raise ValueError(
                f"{model} was trained with num_world_steps={saved.num_world_steps} (its projector has one temporal "
                f"embedding per frame); use --rollout {saved.num_world_steps} or leave --rollout out"
            )
        return TheWorld.from_pretrained(str(model), cosmos_model=cosmos, **options)
    if cosmos is None and options.get("enable_world", True):
        raise ValueError(f"{model} is not a saved TheWorld (no config.json with model_type 'theworld'): pass --cosmos "
                         "(a Cosmos-Predict2 Video2World id or dir) to build one on this base Gemma 3, or give a "
                         "training run's model/ directory")
    return TheWorld.from_pretrained(str(model), cosmos_model=cosmos, num_world_steps=num_world_steps or 0, **options)
