"""The Cosmos safety checker as a ZeroMQ service (light client side imports no torch)."""
