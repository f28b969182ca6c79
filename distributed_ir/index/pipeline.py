"""Ray Data corpus encoding into Parquet embedding shards written by the workers, then FAISS.

    stage (Ray tasks: validate, shard by id hash, ids digest per shard; files on the output location)
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
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed_ir import faults
from distributed_ir.data.intake import MAX_TEXT_BYTES, InputCheck
from distributed_ir.index.actors import ActorPlan, release_failed_pool, starting_actors
from distributed_ir.index.actors import actor_plan as _actor_plan
from distributed_ir.index.corpus import StagedShard, expand_corpus, stage_corpus
from distributed_ir.index.parts import build_parts
from distributed_ir.index.shards import read_shard, shard_is_valid, verified_ids_digest, write_shard
from distributed_ir.index.storage import Location, check_output
from distributed_ir.index.texts import STAGE
from distributed_ir.models.embedder import resolve_model_path
from distributed_ir.models.precision import PrecisionPolicy, collect_decisions, summarize_decisions

MANIFEST = "manifest.json"
__all__ = ["MANIFEST", "IndexOptions", "build_faiss", "check_inputs", "encode_corpus", "read_shard", "shard_is_valid",
           "write_shard"]


@dataclass
class IndexOptions:
    model: str = "default"
    corpus: str | list[str] = ""
    out: str = "outputs/index"
    index_type: str = "Flat"
    num_shards: int = 4
    index_shards: int = 1
    batch_size: int = 64
    precision: str = "auto"  # auto | fp32 | bf16 | bf16w | fp16 | int8 (models.precision)
    min_cosine: float = 0.99  # auto's quality gate: cosine of each calibration vector to fp32's
    precision_cache: str = ""  # '' = $DIR_PRECISION_CACHE, else ~/.cache/distributed-ir/precision
    calibration_texts: int = 32  # auto measures on this many of the first texts an actor sees
    use_gpu: bool = False
    # Encode pool size: ``actors`` > 0 is a fixed pool; else it autoscales from min_actors (0 = 1)
    # to max_actors (0 = one per shard to encode) as the cluster has room (index.actors).
    actors: int = 0
    min_actors: int = 0
    max_actors: int = 0
    on_error: str = "raise"  # raise | skip (bad documents go to rejects_path)
    rejects_path: str = ""  # '' = <out>/rejects.jsonl
    max_text_bytes: int = MAX_TEXT_BYTES
    # An encode actor that dies (OOM, node loss) is restarted and its batch retried; bounded so a
    # deterministic crash fails the job instead of looping forever.
    actor_restarts: int = 3
    # Workers lost with their node (removed, preempted) end Ray Data's run: the unfinished shards then
    # run again on a fresh pool, at most this many times.
    node_failure_retries: int = 2
    # Custom Ray resources each encode actor asks for (e.g. {"encoder": 1} to pin encoding to
    # the nodes that advertise it); actors beyond what the nodes have wait, as demand for the autoscaler.
    actor_resources: dict[str, float] = field(default_factory=dict)
    # Encoding starts once min_actors are up; a resource the cluster lacks (GPU, a custom one) is
    # waited for this long (an autoscaler may add nodes) before failing with ActorStartTimeout.
    actor_start_timeout_s: int = 600


def check_inputs(opts: IndexOptions) -> list[Path]:
    """Corpus files, model folder and output location, checked before a Ray cluster is started or
    joined (a typo then costs no cluster start). Returns the corpus files."""
    from distributed_ir.config_loader import ConfigError

    paths = expand_corpus(opts.corpus)  # DataError naming the missing path
    resolve_model_path(opts.model)  # ConfigError: not a local folder
    try:
        check_output(opts.out)
    except ValueError as e:
        raise ConfigError(str(e), "out") from e
    return paths


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


def encode_plan(opts: IndexOptions, units: int = 0) -> ActorPlan:
    """The encode pool: :func:`distributed_ir.index.actors.actor_plan` for these options and
    ``units`` shards to encode (a fixed ``actors`` pool, else ``min_actors..max_actors``)."""
    return _actor_plan(opts.use_gpu, opts.actors, opts.min_actors, opts.max_actors, units, opts.actor_resources)


def map_encode(ds, out: Location, stage: Location, model: str, opts: IndexOptions, plan: ActorPlan):
    """The encode actors over staged-shard rows (pool arguments: :meth:`ActorPlan.map_kwargs`).

    One input row is one staged shard; ``max_tasks_in_flight_per_actor=1`` so shards go to idle
    actors rather than queueing behind a busy one (a shard is a big unit of work).
    """
    from distributed_ir.index.shards import ShardWriter

    env = faults.forwarded_env(faults.ENCODE_ACTOR)
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"out": out.uri, "stage": stage.uri, "chunk_rows": opts.batch_size * 4, "model": model,
                               "batch_size": opts.batch_size, "precision": precision_policy(opts), "device": plan.device,
                               "threads": plan.threads},
        batch_size=1,
        batch_format="numpy",
        **plan.map_kwargs(max_tasks_in_flight_per_actor=1),
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


def stage_index_corpus(opts: IndexOptions, relay: InputCheck | None = None
                       ) -> tuple[list[StagedShard], str, InputCheck]:
    """Validate and shard ``opts.corpus`` into ``<opts.out>/stage`` as :func:`encode_corpus` does (an
    identical earlier staging is reused): the shards, the stage id and the input counts.
    ``relay``: a check that also gets every reject entry written (a run's own rejects file)."""
    out = _out_location(opts)
    check = InputCheck(opts.on_error, _rejects_path(opts, out), opts.max_text_bytes)
    check.relay = relay
    staged, stage_id = stage_corpus(expand_corpus(opts.corpus), out.child(STAGE), opts.num_shards, check)
    return staged, stage_id, check


def encode_corpus(opts: IndexOptions, progress: bool = True) -> dict[str, Any]:
    """Stage, encode unfinished shards on Ray Data actors (they write the files), return the manifest."""
    out = _out_location(opts)
    model_dir = resolve_model_path(opts.model)
    paths = expand_corpus(opts.corpus)
    stage = out.child(STAGE)
    staged, stage_id, check = stage_index_corpus(opts)
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
    Returns the documents encoded and the actors' precision decisions.

    Losing workers (a node removed or preempted: the actor unreachable, its objects lost) ends Ray
    Data's run; the shards the manifest does not list yet then run again on a fresh pool, at most
    ``node_failure_retries`` times. Exactly once holds because a shard counts only when its
    metadata row arrives, and a re-encoded shard replaces its file atomically. A retry's pool
    starts with one actor: the cluster may now have less room than ``min_actors`` asked for.
    """
    import ray.exceptions as rex

    lost = (rex.ActorUnavailableError, rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError,
            rex.WorkerCrashedError)
    decisions: list[dict[str, Any]] = []
    left = todo
    for attempt in range(opts.node_failure_retries + 1):
        plan = encode_plan(opts, len(left))
        if attempt:
            release_failed_pool()  # else the failed pool's actors keep their slots (see there)
            plan = replace(plan, min_size=1)
        try:
            with starting_actors(plan, opts.actor_start_timeout_s, "encode"):
                _run_encode(out, stage, model_dir, opts, plan, left, manifest, progress, decisions)
            break
        except lost as e:
            if attempt == opts.node_failure_retries:
                raise
            left = [s for s in todo if str(s.index) not in manifest["shards"]]
            print(f"[encode] lost encode workers ({type(e).__name__}); running the {len(left)} unfinished "
                  f"shard(s) again (retry {attempt + 1} of {opts.node_failure_retries})", file=sys.stderr, flush=True)
    return sum(s.count for s in todo), decisions


def _run_encode(out: Location, stage: Location, model_dir: str, opts: IndexOptions, plan: ActorPlan,
                todo: list[StagedShard], manifest: dict, progress: bool, decisions: list[dict[str, Any]]) -> None:
    import ray

    ds = ray.data.from_items([{"shard": s.index, "file": s.file} for s in todo], override_num_blocks=len(todo))
    ds = map_encode(ds, out, stage, model_dir, opts, plan)
    expected = {s.index: s for s in todo}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.count for s in todo), desc="encode corpus", unit="doc")
    written = 0
    try:
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
            written += 1
            if bar:
                bar.update(shard.count)
            faults.after_shard_recorded(written)  # opt-in (env) drill: die like a killed job
    finally:
        if bar:
            bar.close()
    if expected:
        raise RuntimeError(f"shards {sorted(expected)} were not written by any encode actor")


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
                use_gpu: bool = False, start_timeout_s: float = 600) -> dict[str, Any]:
    """Build ``index_shards`` FAISS indexes in Ray tasks from the embedding shard files; return ``index/index.json``.

    No process holds all vectors: a task reads its own embedding shards row group by row group;
    IVF/PQ quantizers are trained once on a sample drawn shard by shard. See
    :func:`distributed_ir.index.parts.build_parts`.
    """
    loc = out if isinstance(out, Location) else Location(out)
    entries = [manifest["shards"][k] for k in sorted(manifest["shards"], key=int)]
    for e in entries:
        loc.path(e["file"])  # a crafted manifest must not make a worker read elsewhere
    return build_parts(loc, entries, factory, int(manifest["dim"]), index_shards, use_gpu,
                       extra={"model": manifest["model"]}, start_timeout_s=start_timeout_s)
