"""Ray Data corpus encoding into Parquet embedding shards written by the workers, then FAISS.

    stage (driver: validate, shard, ids digest per shard; files on the output location)
      -> from_items(unfinished shard descriptors) -> map_batches(ShardWriter, actor pool)
      -> each actor reads its staged shard, encodes it, writes embeddings/shard-N.parquet
         atomically and returns one metadata row (count, sha256, ids digest, node)
      -> driver: manifest entry per row; all shards done: counts + ids digests equal staging's
      -> FAISS: one index per index shard, built in Ray tasks from its embedding shard files

The driver never receives a vector or builds a model. Rerunning skips shards the manifest lists
whose file still matches its checksum and staged ids (checked by Ray tasks next to the data); a
shard file that is missing, truncated or corrupted is re-encoded, never indexed.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ir.data.intake import MAX_TEXT_BYTES, InputCheck
from distributed_ir.index.corpus import StagedShard, expand_corpus, stage_corpus
from distributed_ir.index.parts import build_parts
from distributed_ir.index.shards import read_shard, shard_is_valid, verified_ids_digest, write_shard
from distributed_ir.index.storage import Location
from distributed_ir.models.embedder import resolve_model_path
from distributed_ir.models.precision import PrecisionPolicy, collect_decisions, summarize_decisions

MANIFEST = "manifest.json"
__all__ = ["MANIFEST", "IndexOptions", "build_faiss", "encode_corpus", "read_shard", "shard_is_valid", "write_shard"]


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
    # Custom Ray resources each encode actor asks for (e.g. {"encoder": 1} to pin encoding to
    # the nodes that advertise it); the pool then holds at most as many actors as the cluster has.
    actor_resources: dict[str, float] = field(default_factory=dict)
    # Encoding starts once the whole actor pool is up (so shards spread over every node instead of
    # the first ready actor taking them all); a pool that cannot be placed in this time fails with
    # Ray Data's "Timed out while starting actors" instead of waiting forever.
    actor_start_timeout_s: int = 600
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


def actor_plan(opts: IndexOptions, units: int = 0) -> dict[str, Any]:
    """Actor count and per-actor resources from the cluster, leaving room for read/write tasks.

    At most ``units`` actors (shards to encode) and, with ``actor_resources``, at most as many as
    the cluster's custom resources fit.

    Two actors asking for 1 CPU each on a 2-CPU node hold every CPU and the read tasks (1 CPU
    each) never run: a silent hang. CPU actors therefore reserve 0.5 CPU while running one
    torch thread per core they stand for, so half the CPUs stay schedulable for Ray Data's
    own tasks.
    """
    import ray

    res = ray.cluster_resources()
    fit = min([int(res.get(name, 0) // amount) for name, amount in opts.actor_resources.items() if amount > 0],
              default=0)
    if opts.actor_resources and fit < 1:
        raise RuntimeError(f"actor_resources {opts.actor_resources}: the Ray cluster has none of them")

    def cap(n: int) -> int:
        return max(1, min([n] + [m for m in (fit, units) if m > 0]))

    if opts.use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("use_gpu is set but the Ray cluster has no GPUs")
        return {"size": cap(opts.actors or gpus), "num_gpus": 1, "num_cpus": 1, "threads": 0, "device": "cuda"}
    cpus = int(res.get("CPU", 1))
    size = cap(opts.actors or max(1, cpus))
    return {"size": size, "num_gpus": 0, "num_cpus": 0.5, "threads": max(1, cpus // size), "device": "cpu"}


def map_encode(ds, out: Location, stage: Location, model: str, opts: IndexOptions, plan: dict[str, Any]):
    """The one place that knows Ray Data's map_batches/actor-pool API (Ray 2.60: compute=).

    One input row is one staged shard; ``max_tasks_in_flight_per_actor=1`` so shards go to idle
    actors rather than queueing behind a busy one (a shard is a big unit of work).
    """
    from ray.data import ActorPoolStrategy

    from distributed_ir.index.encode import forwarded_env
    from distributed_ir.index.shards import ShardWriter

    env = forwarded_env()
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"out": out.uri, "stage": stage.uri, "chunk_rows": opts.batch_size * 4, "model": model,
                               "batch_size": opts.batch_size, "precision": precision_policy(opts), "device": plan["device"],
                               "threads": plan["threads"]},
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan["size"], max_tasks_in_flight_per_actor=1),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
        **({"resources": dict(opts.actor_resources)} if opts.actor_resources else {}),
        # Ray 2.60 passes these through ray_remote_args (deprecated for removal in 2.64, which
        # leaves Ray Data's own default: unbounded restarts/retries). A retried shard rewrites
        # its file from scratch: writes are atomic, so a half-written attempt is never seen.
        max_restarts=opts.actor_restarts,
        max_task_retries=opts.actor_restarts,
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )


def _out_location(opts: IndexOptions) -> Location:
    loc = Location(opts.out)
    loc.mkdir()
    return loc


def precision_policy(opts: IndexOptions) -> PrecisionPolicy:
    return PrecisionPolicy(opts.precision, min_cosine=opts.min_cosine, cache_dir=opts.precision_cache,
                           calibration_texts=opts.calibration_texts)



def _rejects_path(opts: IndexOptions, out: Location) -> str | Path:
    """Rejects are appended locally: beside the index for a local folder, else ./rejects.jsonl."""
    return opts.rejects_path or (out.local_path("rejects.jsonl") if out.local else Path("rejects.jsonl").resolve())


def _reusable(out: Location, manifest: dict, staged: list[StagedShard]) -> dict[str, dict]:
    """Manifest entries whose file still matches its checksum and staged ids; checked in Ray tasks
    (next to the storage, in parallel), so the driver reads no shard file."""
    import ray

    by_key = {str(s.index): s for s in staged}
    keys = [k for k in manifest.get("shards", {}) if k in by_key]
    if not keys:
        return {}
    check = ray.remote(num_cpus=0.25)(verified_ids_digest)
    digests = ray.get([check.remote(out, manifest["shards"][k]) for k in keys])
    return {k: manifest["shards"][k] for k, d in zip(keys, digests)
            if d is not None and d == by_key[k].ids_digest and manifest["shards"][k]["count"] == by_key[k].count}


def encode_corpus(opts: IndexOptions, progress: bool = True) -> dict[str, Any]:
    """Stage, encode unfinished shards on Ray Data actors (they write the files), return the manifest."""
    out = _out_location(opts)
    model_dir = resolve_model_path(opts.model)
    paths = expand_corpus(opts.corpus)
    check = InputCheck(opts.on_error, _rejects_path(opts, out), opts.max_text_bytes)
    stage = out.child("stage")
    staged, stage_id = stage_corpus(paths, stage, opts.num_shards, check)
    if check.summary()["rejected"]:
        print(check.summary_line(), flush=True)
    fingerprint = model_fingerprint(model_dir)
    manifest = out.read_json(MANIFEST) if out.is_file(MANIFEST) else {}
    if manifest and manifest.get("model_fingerprint") != fingerprint:
        raise RuntimeError(f"{out.uri}/{MANIFEST}: built with another model ({manifest.get('model')}); "
                           "use a new --out folder")
    if manifest.get("stage_id") != stage_id:
        manifest["shards"] = {}  # corpus or sharding changed: nothing earlier can be reused
    manifest.update({"model": str(model_dir), "model_fingerprint": fingerprint, "stage_id": stage_id,
                     "num_docs": sum(s.count for s in staged), "corpus": [str(p) for p in paths], "dtype": "float32",
                     "input": check.summary()})
    manifest["shards"] = _reusable(out, manifest, staged)
    todo = [s for s in staged if str(s.index) not in manifest["shards"]]
    t0 = time.perf_counter()
    encoded_docs, decisions = (_encode_shards(out, stage, model_dir, opts, todo, manifest, progress)
                             if todo else (0, []))
    seconds = time.perf_counter() - t0
    verify_exact(manifest, staged)
    manifest["last_run"] = {"encoded_docs": encoded_docs, "skipped_shards": len(staged) - len(todo),
                            "seconds": round(seconds, 2), "docs_per_s": round(encoded_docs / seconds, 2) if encoded_docs else None,
                            "writer_nodes": sorted({e.get("node_id", "") for e in manifest["shards"].values()} - {""})}
    if decisions:  # what encoded the vectors: precision chosen per actor, with auto's timings
        manifest["precision"] = manifest["last_run"]["precision"] = summarize_decisions(opts.precision, decisions)
        for d in manifest["precision"]["decisions"]:
            print(f"[index] encode precision: {d['chosen']} (requested {d['requested']}"
                  + (f", speed-up vs fp32 {d['speedup_vs_fp32']}" if d.get("seconds") else "") + ")", flush=True)
    out.write_json(MANIFEST, manifest)
    return manifest


def _encode_shards(out: Location, stage: Location, model_dir: str, opts: IndexOptions, todo: list[StagedShard],
                   manifest: dict, progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """Hand the unfinished shards to the encode actors; record each returned metadata row as it arrives.
    Returns the documents encoded and the actors' precision decisions."""

    from ray.data import DataContext

    plan = actor_plan(opts, len(todo))
    ctx = DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, opts.actor_start_timeout_s
    try:
        return _run_encode(out, stage, model_dir, opts, plan, todo, manifest, progress)
    finally:
        ctx.wait_for_min_actors_s = saved


def _run_encode(out: Location, stage: Location, model_dir: str, opts: IndexOptions, plan: dict[str, Any],
                todo: list[StagedShard], manifest: dict, progress: bool) -> tuple[int, list[dict[str, Any]]]:
    import ray

    ds = ray.data.from_items([{"shard": s.index, "file": s.file} for s in todo], override_num_blocks=len(todo))
    ds = map_encode(ds, out, stage, model_dir, opts, plan)
    expected = {s.index: s for s in todo}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.count for s in todo), desc="encode corpus", unit="doc")
    encoded = written = 0
    decisions: list[dict[str, Any]] = []
    for row in ds.iter_rows():
        shard = expected.pop(int(row["shard"]))
        decisions += collect_decisions([row["precision_decision"]])
        entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                 if k not in ("shard", "dim", "precision_decision")}
        if entry["count"] != shard.count or entry["ids_digest"] != shard.ids_digest:
            raise RuntimeError(f"shard {shard.index}: the worker wrote {entry['count']} ids (digest "
                               f"{entry['ids_digest']}), staging has {shard.count} ({shard.ids_digest})")
        manifest["dim"] = int(row["dim"])
        manifest["shards"][str(shard.index)] = entry
        out.write_json(MANIFEST, manifest)
        encoded += shard.count
        written += 1
        if bar:
            bar.update(shard.count)
        if opts.fail_after_shards and written >= opts.fail_after_shards:
            os._exit(17)  # fault injection for resume tests: die like a killed job
    if bar:
        bar.close()
    if expected:
        raise RuntimeError(f"shards {sorted(expected)} were not written by any encode actor")
    return encoded, decisions


def verify_exact(manifest: dict, staged: list[StagedShard]) -> None:
    """Each embedding shard holds exactly its staged shard's ids, each once: equal counts and equal
    order-independent id digests (staging already guaranteed ids are unique across the corpus).

    Metadata only: the digests were computed where the shard files were written or re-verified.
    """
    for s in staged:
        entry = manifest["shards"].get(str(s.index))
        if entry is None or entry["count"] != s.count or entry.get("ids_digest") != s.ids_digest:
            raise RuntimeError(f"shard {s.index}: {entry and entry['count']} embeddings for {s.count} documents "
                               "or ids differ from the staged shard")


def build_faiss(out: Path | str | Location, manifest: dict, factory: str, index_shards: int = 1,
                use_gpu: bool = False) -> dict[str, Any]:
    """Build ``index_shards`` FAISS indexes in Ray tasks from the embedding shard files; return ``index/index.json``.

    No process holds all vectors: a task reads its own embedding shards row group by row group;
    IVF/PQ quantizers are trained once on a sample drawn shard by shard. See
    :func:`distributed_ir.index.faiss_index.build_parts`.
    """
    loc = out if isinstance(out, Location) else Location(out)
    entries = [manifest["shards"][k] for k in sorted(manifest["shards"], key=int)]
    for e in entries:
        loc.path(e["file"])  # a crafted manifest must not make a worker read elsewhere
    return build_parts(loc, entries, factory, int(manifest["dim"]), index_shards, use_gpu,
                       extra={"model": manifest["model"]})
