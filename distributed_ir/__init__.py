"""distributed-ir: Ray-native fine-tuning, indexing and evaluation of retrieval models."""

__version__ = "0.1.0"
