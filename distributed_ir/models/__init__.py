"""Models: pooling, the bi-encoder embedder and the three rerankers."""

from distributed_ir.models.colbert import ColBERTReranker
from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.models.embedder import Embedder, EmbedderSettings
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.models.pooling import pool
from distributed_ir.models.rerankers import RERANKER_CLASSES, load_reranker
from distributed_ir.models.reranking import Reranker, RerankerSettings

__all__ = ["ColBERTReranker", "CrossEncoderReranker", "Embedder", "EmbedderSettings", "LLMReranker", "RERANKER_CLASSES", "Reranker",
           "RerankerSettings", "load_reranker", "pool"]
