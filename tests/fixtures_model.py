"""Session fixtures for the model side (tiny Gemma 3 + tiny Cosmos)."""
