"""Embedding shards: Parquet files (``doc_id``, ``embedding``) written by the encode workers themselves.

:class:`ShardWriter` is the Ray Data callable of ``distributed-ir index``: each call receives
staged-shard descriptors (never texts or vectors from the driver), reads the staged shard from the
shared location, encodes it with :class:`~distributed_ir.index.encode.EncodeStage` chunk by chunk,
streams the vectors into ``embeddings/shard-N.parquet`` (atomic), and returns one metadata row:
shard, file, count, sha256, ids digest, dim and the node that wrote it. The driver only ever sees
those rows.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.index.corpus import ids_digest
from distributed_ir.index.storage import Location

EMBEDDINGS = "embeddings"
ROW_GROUP = 8192  # rows per Parquet row group: what a reader (FAISS build) holds at once


def shard_file(index: int) -> str:
    return f"{EMBEDDINGS}/shard-{index:05d}.parquet"


def _loc(out: Location | Path | str) -> Location:
    return out if isinstance(out, Location) else Location(out)


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def embedding_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({"doc_id": pa.array(ids, pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                    schema=embedding_schema(dim))


def write_shard(out: Location | Path | str, index: int, ids: list[str], vectors: np.ndarray) -> dict[str, Any]:
    """Write one embedding shard atomically from memory; return its manifest entry."""
    loc = _loc(out)
    name = shard_file(index)
    with loc.open_atomic(name) as fh:
        pq.write_table(embedding_table(ids, vectors), fh)
    return {"file": name, "count": len(ids), "sha256": loc.sha256(name), "ids_digest": ids_digest(ids)}


def iter_shard(out: Location | Path | str, entry: dict) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, vectors)`` per row group of the shard: what a bounded-memory reader consumes."""
    loc = _loc(out)
    with loc.open_input(entry["file"]) as fh:
        pf = pq.ParquetFile(fh)
        dim = pf.schema_arrow.field("embedding").type.list_size
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i)
            vectors = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
            yield t.column("doc_id").to_pylist(), vectors


def read_shard(out: Location | Path | str, entry: dict) -> tuple[list[str], np.ndarray]:
    """The whole shard in memory (tests and small tools; the pipeline streams with :func:`iter_shard`)."""
    ids: list[str] = []
    parts = []
    for i, v in iter_shard(out, entry):
        ids += i
        parts.append(v)
    return ids, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def shard_is_valid(out: Location | Path | str, entry: dict) -> bool:
    """The manifest's shard file exists, is inside ``out`` and matches its checksum."""
    loc = _loc(out)
    try:
        return loc.is_file(entry["file"]) and loc.sha256(entry["file"]) == entry["sha256"]
    except (ValueError, OSError, KeyError):
        return False


def verified_ids_digest(out: Location | Path | str, entry: dict) -> str | None:
    """The ids digest of a shard file that matches its manifest checksum, else None (re-encode it).

    Runs where the file is (a Ray task on resume), so the driver reads no shard.
    """
    loc = _loc(out)
    if not shard_is_valid(loc, entry):
        return None
    with loc.open_input(entry["file"]) as fh:
        ids = pq.read_table(fh, columns=["doc_id"]).column("doc_id").to_pylist()
    return ids_digest(ids) if len(ids) == entry.get("count") and len(set(ids)) == len(ids) else None


def node_identity() -> dict[str, str]:
    """Ray node id and IP of this worker (hostname outside Ray): recorded per shard in the manifest."""
    try:
        import ray

        if ray.is_initialized():
            return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - identity is informative; never fail a shard over it
        pass
    return {"node_id": socket.gethostname(), "node_ip": ""}


class ShardWriter:
    """``__call__({"shard", "file", "count"}) -> {"shard", "file", "count", "sha256", "ids_digest", ...}``.

    Args:
        out: output location (folder or URI) the shard files go to.
        stage: location of the staged corpus shards.
        chunk_rows: documents per :class:`EncodeStage` call (its ``batch_size`` splits them further).
        Other keywords go to :class:`EncodeStage` (``model``, ``batch_size``, ``precision``, ``device``, ``threads``).
    The output also has a ``precision_decision`` column: the precision decision's JSON on this
    actor's first row (``""`` elsewhere).
    """

    def __init__(self, out: str, stage: str, chunk_rows: int = 256, **encode: Any):
        from distributed_ir.index.encode import EncodeStage

        self.out, self.stage = Location(out), Location(stage)
        self.chunk_rows = chunk_rows
        self.encoder = EncodeStage(kind="document", **encode)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.encode_shard(int(s), str(f)) for s, f in zip(batch["shard"], batch["file"])]
        out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        out["precision_decision"] = self.encoder.choice.report_column(len(rows))  # what ran, once per actor
        return out

    def encode_shard(self, shard: int, staged_file: str) -> dict[str, Any]:
        """Encode one staged shard into its embedding shard file; return the metadata row."""
        t0 = time.perf_counter()
        name = shard_file(shard)
        schema = embedding_schema(self.encoder.dim)
        ids_all: list[str] = []
        pending: list[pa.Table] = []
        with self.stage.open_input(staged_file) as src, self.out.open_atomic(name) as sink, \
                pq.ParquetWriter(sink, schema) as writer:
            for rb in pq.ParquetFile(src).iter_batches(batch_size=self.chunk_rows, columns=["doc_id", "text", "shard"]):
                cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in ("doc_id", "text", "shard")}
                enc = self.encoder(cols)  # EncodeStage.__call__: the fault-injection hook counts these
                ids = [str(d) for d in enc["doc_id"]]
                ids_all += ids
                pending.append(embedding_table(ids, enc["embedding"]))
                if sum(t.num_rows for t in pending) >= ROW_GROUP:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
        if len(set(ids_all)) != len(ids_all):
            raise RuntimeError(f"{staged_file}: duplicate ids in a staged shard")
        return {"shard": shard, "file": name, "count": len(ids_all), "sha256": self.out.sha256(name),
                "ids_digest": ids_digest(ids_all), "dim": self.encoder.dim,
                "seconds": round(time.perf_counter() - t0, 3), **node_identity()}
