"""Retrieval-augmented generation on LangChain: embeddings, index retriever, reranking, chain."""

from distributed_ir.rag.reranker import Reranker

__all__ = ["Reranker"]
