"""Indexing: Ray Data corpus encoding (EncodeStage) into Parquet shards and FAISS indexes."""
