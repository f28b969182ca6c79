"""Ray Data corpus encoding into Parquet embedding shards, then a FAISS index.

    stage (validate, shard)  ->  read_parquet(unfinished shards).repartition(blocks)
      -> map_batches(EncodeStage, actor pool)  ->  driver groups rows by shard
      -> shard complete: write embeddings/shard-N.parquet atomically + manifest entry
      -> all shards done: check every corpus id is present exactly once -> FAISS index

Rerunning skips shards the manifest lists with a matching checksum (a killed job resumes);
a shard file that is missing, truncated or corrupted is re-encoded, never indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.data.intake import MAX_TEXT_BYTES, InputCheck
from distributed_ir.index.corpus import StagedShard, expand_corpus, inside, stage_corpus
from distributed_ir.index.faiss_index import ShardedIndex, build_index
from distributed_ir.models.embedder import resolve_model_path
from distributed_ir.models.precision import PrecisionPolicy, collect_decisions, summarize_decisions

MANIFEST = "manifest.json"


@dataclass
class IndexOptions:
    model: str = "default"
    corpus: str | list[str] = ""
    out: str = "outputs/index"
    index_type: str = "Flat"
    num_shards: int = 4
    index_shards: int = 1
    batch_size: int = 64
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 | int8 (models.precision)
    min_cosine: float = 0.99  # auto's quality gate: cosine of each calibration vector to fp32's
    precision_cache: str = ""  # '' = $DIR_PRECISION_CACHE, else ~/.cache/distributed-ir/precision
    calibration_texts: int = 32  # auto measures on this many of the first texts an actor sees
    use_gpu: bool = False
    actors: int = 0  # 0 = size from cluster resources
    on_error: str = "raise"  # raise | skip (bad documents go to rejects_path)
    rejects_path: str = ""  # '' = <out>/rejects.jsonl
    max_text_bytes: int = MAX_TEXT_BYTES
    # An encode actor that dies (OOM, node loss) is restarted and its batch retried; bounded so a
    # deterministic crash fails the job instead of looping forever.
    actor_restarts: int = 3
    fail_after_shards: int = field(default_factory=lambda: int(os.environ.get("DIR_FAIL_AFTER_SHARDS", "0")))


def model_fingerprint(model_dir: str) -> str:
    """Hash of every model file (weights, tokenizer, pooling, settings): another model's
    embeddings must never mix into an index."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix != ".md"):
        h.update(str(path.relative_to(root)).encode())
        h.update(_sha256(path).encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def shard_is_valid(out: Path, entry: dict) -> bool:
    """The manifest's shard file exists, is inside ``out`` and matches its checksum."""
    try:
        path = inside(out, entry["file"])
    except ValueError:
        return False
    return path.is_file() and _sha256(path) == entry["sha256"]


def actor_plan(opts: IndexOptions) -> dict[str, Any]:
    """Actor count and per-actor resources from the cluster, leaving room for read/write tasks.

    Two actors asking for 1 CPU each on a 2-CPU node hold every CPU and the read tasks (1 CPU
    each) never run: a silent hang. CPU actors therefore reserve 0.5 CPU while running one
    torch thread per core they stand for, so half the CPUs stay schedulable for Ray Data's
    own tasks.
    """
    import ray

    res = ray.cluster_resources()
    if opts.use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("use_gpu is set but the Ray cluster has no GPUs")
        return {"size": opts.actors or gpus, "num_gpus": 1, "num_cpus": 1, "threads": 0, "device": "cuda"}
    cpus = int(res.get("CPU", 1))
    size = opts.actors or max(1, cpus)
    return {"size": size, "num_gpus": 0, "num_cpus": 0.5, "threads": max(1, cpus // size), "device": "cpu"}


def map_encode(ds, model: str, opts: IndexOptions, plan: dict[str, Any]):
    """The one place that knows Ray Data's map_batches/actor-pool API (Ray 2.60: compute=)."""
    from ray.data import ActorPoolStrategy

    from distributed_ir.index.encode import EncodeStage, forwarded_env

    env = forwarded_env()
    return ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"model": model, "kind": "document", "batch_size": opts.batch_size,
                               "precision": precision_policy(opts), "device": plan["device"],
                               "threads": plan["threads"], "report_precision": True},
        batch_size=opts.batch_size * 4,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan["size"]),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
        # Ray 2.60 passes these through ray_remote_args (deprecated for removal in 2.64, which
        # leaves Ray Data's own default: unbounded restarts/retries).
        max_restarts=opts.actor_restarts,
        max_task_retries=opts.actor_restarts,
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )


def precision_policy(opts: IndexOptions) -> PrecisionPolicy:
    return PrecisionPolicy(opts.precision, min_cosine=opts.min_cosine, cache_dir=opts.precision_cache,
                           calibration_texts=opts.calibration_texts)


def write_shard(out: Path, index: int, ids: list[str], vectors: np.ndarray) -> dict[str, Any]:
    """Write one embedding shard atomically; return its manifest entry."""
    emb_dir = out / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    name = f"shard-{index:05d}.parquet"
    dim = vectors.shape[1]
    table = pa.table({"doc_id": pa.array(ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)})
    tmp = emb_dir / (name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, emb_dir / name)
    return {"file": f"embeddings/{name}", "count": len(ids), "sha256": _sha256(emb_dir / name)}


def read_shard(out: Path, entry: dict) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(inside(out, entry["file"]))
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("doc_id").to_pylist(), vectors


def encode_corpus(opts: IndexOptions, progress: bool = True) -> dict[str, Any]:
    """Stage, encode unfinished shards with Ray Data, and return the completed manifest."""
    import ray

    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path(opts.model)
    paths = expand_corpus(opts.corpus)
    check = InputCheck(opts.on_error, opts.rejects_path or out / "rejects.jsonl", opts.max_text_bytes)
    staged, stage_id = stage_corpus(paths, out / "stage", opts.num_shards, check)
    if check.summary()["rejected"]:
        print(check.summary_line(), flush=True)
    fingerprint = model_fingerprint(model_dir)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest and manifest.get("model_fingerprint") != fingerprint:
        raise RuntimeError(f"{manifest_path}: built with another model ({manifest.get('model')}); "
                           "use a new --out folder")
    if manifest.get("stage_id") != stage_id:
        manifest["shards"] = {}  # corpus or sharding changed: nothing earlier can be reused
    manifest.update({"model": str(model_dir), "model_fingerprint": fingerprint, "stage_id": stage_id,
                     "num_docs": sum(s.count for s in staged), "corpus": [str(p) for p in paths], "dtype": "float32",
                     "input": check.summary()})
    staged_keys = {str(s.index) for s in staged}
    done = {k: v for k, v in manifest.get("shards", {}).items() if k in staged_keys and shard_is_valid(out, v)}
    manifest["shards"] = done
    todo = [s for s in staged if str(s.index) not in done]
    t0 = time.perf_counter()
    encoded_docs = 0
    decisions: list[dict[str, Any]] = []
    if todo:
        plan = actor_plan(opts)
        # One Parquet file is one read task: re-block (streaming) so every actor gets work.
        rows_per_block = max(opts.batch_size, min(2000, sum(s.count for s in todo) // (4 * plan["size"]) + 1))
        ds = ray.data.read_parquet([str(s.path) for s in todo]).repartition(target_num_rows_per_block=rows_per_block)
        ds = map_encode(ds, model_dir, opts, plan)
        expected = {s.index: s.count for s in todo}
        pending: dict[int, tuple[list[str], list[np.ndarray]]] = {s.index: ([], []) for s in todo}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(expected.values()), desc="encode corpus", unit="doc")
        written = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            decisions += collect_decisions(batch["precision_decision"])
            for shard in np.unique(batch["shard"]):
                rows = batch["shard"] == shard
                ids, vecs = pending[int(shard)]
                ids.extend(batch["doc_id"][rows].tolist())
                vecs.append(batch["embedding"][rows])
                if len(ids) == expected[int(shard)]:
                    vectors = np.concatenate(vecs)
                    manifest["dim"] = int(vectors.shape[1])
                    manifest["shards"][str(int(shard))] = write_shard(out, int(shard), ids, vectors)
                    _atomic_json(manifest_path, manifest)
                    del pending[int(shard)]
                    written += 1
                    if opts.fail_after_shards and written >= opts.fail_after_shards:
                        os._exit(17)  # fault injection for resume tests: die like a killed job
            encoded_docs += len(batch["doc_id"])
            if bar:
                bar.update(len(batch["doc_id"]))
        if bar:
            bar.close()
        if pending:
            raise RuntimeError(f"shards {sorted(pending)} incomplete after encoding: "
                               f"{ {k: len(v[0]) for k, v in pending.items()} } of {expected}")
    seconds = time.perf_counter() - t0
    verify_exact(out, manifest, staged)
    manifest["last_run"] = {"encoded_docs": encoded_docs, "skipped_shards": len(staged) - len(todo),
                            "seconds": round(seconds, 2), "docs_per_s": round(encoded_docs / seconds, 2) if encoded_docs else None}
    if decisions:  # what encoded the vectors: precision chosen per actor, with auto's timings
        manifest["precision"] = manifest["last_run"]["precision"] = summarize_decisions(opts.precision, decisions)
        for d in manifest["precision"]["decisions"]:
            print(f"[index] encode precision: {d['chosen']} (requested {d['requested']}"
                  + (f", speed-up vs fp32 {d['speedup_vs_fp32']}" if d.get("seconds") else "") + ")", flush=True)
    _atomic_json(manifest_path, manifest)
    return manifest


def verify_exact(out: Path, manifest: dict, staged: list[StagedShard]) -> None:
    """Each embedding shard holds exactly its staged shard's ids, each once (staging already
    guaranteed ids are unique across the corpus)."""
    for s in staged:
        entry = manifest["shards"].get(str(s.index))
        if entry is None or entry["count"] != s.count:
            raise RuntimeError(f"shard {s.index}: {entry and entry['count']} embeddings for {s.count} documents")
        ids, _ = read_shard(out, entry)
        expected = pq.read_table(s.path, columns=["doc_id"]).column("doc_id").to_pylist()
        if len(ids) != len(set(ids)) or set(ids) != set(expected):
            raise RuntimeError(f"{entry['file']}: ids differ from staged shard {s.path.name}")


def build_faiss(out: Path, manifest: dict, factory: str, index_shards: int = 1, use_gpu: bool = False) -> ShardedIndex:
    """Build ``index_shards`` FAISS indexes over the embedding shards and save them in ``out/index``."""
    doc_ids: list[str] = []
    vectors = []
    for key in sorted(manifest["shards"], key=int):
        ids, vecs = read_shard(out, manifest["shards"][key])
        doc_ids.extend(ids)
        vectors.append(vecs)
    allvec = np.concatenate(vectors)
    positions = np.arange(len(doc_ids), dtype=np.int64)
    parts = np.array_split(positions, index_shards)
    indexes = [build_index(allvec[p], p, factory, use_gpu=use_gpu) for p in parts if len(p)]
    index = ShardedIndex(indexes, doc_ids)
    index.save(out / "index")
    _atomic_json(out / "index" / "index.json", {"factory": factory, "ntotal": index.ntotal, "shards": len(indexes),
                                                "model": manifest["model"], "dim": manifest["dim"]})
    return index
