"""TheWorld: Gemma 3 + Cosmos world tokens, trained with autograd intact."""
