"""TheWorld's model: Gemma 3 + the Cosmos world encoder + the world projector."""
from theworld.modeling.modeling_theworld import TheWorld
from theworld.modeling.projector import WorldProjector
from theworld.modeling.world_encoder import CosmosWorldEncoder

__all__ = ["TheWorld", "WorldProjector", "CosmosWorldEncoder"]
