"""Models: pooling and the bi-encoder embedder (more model types live beside it)."""

from distributed_ir.models.embedder import Embedder, EmbedderSettings
from distributed_ir.models.pooling import pool

__all__ = ["Embedder", "EmbedderSettings", "pool"]
