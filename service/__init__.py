"""The teacher service: protocol codec, batcher, teacher, cache writer, and the client."""

__version__ = "0.1.0"
