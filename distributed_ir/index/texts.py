"""Document texts by id from a staged corpus, read on Ray next to the data.

An index folder's ``stage/`` holds the validated corpus as Parquet shards of ``doc_id, text``
(:func:`distributed_ir.index.corpus.stage_corpus`). :class:`StagedCorpus` is that folder as a text
source: one Ray task per staged shard scans the shard's ``doc_id`` column row group by row group
and reads the text of the requested rows only, so no process holds the corpus and the driver
receives only what it asked for (texts, text digests or lengths of the requested ids).

    texts(ids)   -> {id: text}          training records (qrels pairs, mined triplets)
    digests(ids) -> {id: 16-byte hash}  mining's duplicate-text check, without the texts
    find(ids)    -> FoundTexts          reranking: lengths to the driver, texts kept in the
                                        object store and attached to pairs by :func:`attach_texts`
    holds(ids)   -> {id, ...}           the requested ids the corpus holds (no text is read):
                                        :func:`check_qrels_staged` checks qrels against it

A requested id that the staged corpus lacks is an error naming it (:class:`MissingDocuments`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_ir.data.beir import BeirDataset, check_qrels_docs
from distributed_ir.data.intake import InputCheck
from distributed_ir.index.corpus import STAGE_FILE
from distributed_ir.index.storage import Location

STAGE = "stage"  # the staged corpus inside an index folder (index.pipeline.stage_index_corpus)
SCAN_CPUS = 0.25  # a shard scan is I/O and a hash lookup: it fits beside the encode/search actors
SHOWN = 10  # missing ids named in an error


class MissingDocuments(KeyError):
    """Requested documents that the staged corpus does not hold (``missing``: their ids)."""

    def __init__(self, missing: list[str], requested: int, where: str):
        self.missing = missing
        shown = ", ".join(repr(d) for d in missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
        super().__init__(f"{len(missing)} of {requested} requested documents are not in the staged corpus "
                         f"{where}: {shown}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class FoundTexts:
    """Requested documents located in the staged shards: each one's text length (characters, as
    ``len(str)`` counts them) for the driver, and their texts as Arrow tables ``(doc_id, text)``, one
    per shard, left in the object store (``refs``) for :func:`attach_texts`."""

    lengths: dict[str, int]
    refs: list[Any]


class StagedCorpus:
    """The staged corpus of the index folder ``index_dir`` (a local path or a URI) as a text source."""

    def __init__(self, index_dir: str | Path | Location):
        root = index_dir if isinstance(index_dir, Location) else Location(index_dir)
        self.stage = root.child(STAGE)

    def __repr__(self) -> str:
        return f"StagedCorpus({self.stage.uri!r})"

    def files(self) -> list[str]:
        """The staged shard files, in shard order (as ``stage.json`` lists them)."""
        meta = self.stage.read_json(STAGE_FILE)
        files = [s["file"] for s in sorted(meta["shards"], key=lambda s: s["index"])]
        for f in files:
            self.stage.path(f)  # a crafted stage.json must not make a task read elsewhere
        return files

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        """``{id: text}`` for exactly the requested ids."""
        tables = self._scan(ids, "text")
        return {d: t for table in tables for d, t in zip(table["doc_id"].to_pylist(), table["text"].to_pylist())}

    def digests(self, ids: Iterable[str]) -> dict[str, bytes]:
        """``{id: blake2b-128 of the text}`` for exactly the requested ids: equal texts, equal digests."""
        tables = self._scan(ids, "digest")
        return {d: h for table in tables for d, h in zip(table["doc_id"].to_pylist(), table["digest"].to_pylist())}

    def find(self, ids: Iterable[str]) -> FoundTexts:
        """The requested documents' lengths (to this process) and texts (left in the object store)."""
        import ray

        wanted, tasks = self._start(ids, "find")
        tables = ray.get([t[0] for t in tasks])
        lengths = {d: n for table in tables for d, n in zip(table["doc_id"].to_pylist(), table["length"].to_pylist())}
        self._check(wanted, lengths)
        return FoundTexts(lengths=lengths, refs=[t[1] for t in tasks])

    def holds(self, ids: Iterable[str]) -> set[str]:
        """The requested ids that the staged corpus holds (the shards' id columns only are read)."""
        import ray

        _, tasks = self._start(ids, "ids")
        return {d for table in ray.get(tasks) for d in table["doc_id"].to_pylist()}

    def _start(self, ids: Iterable[str], form: str) -> tuple[pa.Array, list]:
        import ray

        wanted = pa.array(sorted(set(ids)), pa.string())
        if not len(wanted):
            return wanted, []
        ref = ray.put(wanted)  # one copy in the object store, read by every shard's task
        scan = ray.remote(num_cpus=SCAN_CPUS, num_returns=2 if form == "find" else 1)(_scan_shard)
        return wanted, [scan.remote(self.stage, f, ref, form) for f in self.files()]

    def _scan(self, ids: Iterable[str], form: str) -> list[pa.Table]:
        import ray

        wanted, tasks = self._start(ids, form)
        tables = ray.get(tasks)
        self._check(wanted, {d for table in tables for d in table["doc_id"].to_pylist()})
        return tables

    def _check(self, wanted: pa.Array, found) -> None:
        if len(found) < len(wanted):
            missing = [d for d in wanted.to_pylist() if d not in found]
            raise MissingDocuments(missing, len(wanted), self.stage.uri)


def _scan_shard(stage: Location, file: str, wanted: pa.Array, form: str):
    """The rows of one staged shard whose id is in ``wanted`` (one row group in memory at a time):
    ``(doc_id, text)``, ``(doc_id, digest)``, ``(doc_id)`` for ``ids``, or for ``find`` the pair
    ``((doc_id, length), (doc_id, text))``."""
    parts = []
    with stage.open_input(file) as fh:
        shard = pq.ParquetFile(fh)
        for group in range(shard.num_row_groups):
            ids = shard.read_row_group(group, columns=["doc_id"])
            hit = pc.is_in(ids.column("doc_id"), value_set=wanted)
            if pc.any(hit).as_py():
                parts.append(ids.filter(hit) if form == "ids" else
                             shard.read_row_group(group, columns=["doc_id", "text"]).filter(hit))
    if form == "ids":
        return pa.concat_tables(parts) if parts else pa.table({"doc_id": pa.array([], pa.string())})
    found = pa.concat_tables(parts) if parts else pa.table({"doc_id": pa.array([], pa.string()),
                                                            "text": pa.array([], pa.string())})
    if form == "text":
        return found
    if form == "digest":
        digests = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                   for t in found["text"].to_pylist()]
        return pa.table({"doc_id": found["doc_id"], "digest": pa.array(digests, pa.binary(16))})
    return pa.table({"doc_id": found["doc_id"], "length": pc.utf8_length(found["text"])}), found


def attach_texts(batch: pa.Table, refs: list[Any]) -> pa.Table:
    """``batch`` with its ``doc_id`` column replaced by a ``document`` column (the texts of
    :attr:`FoundTexts.refs`); row order kept. A Ray Data ``map_batches`` function."""
    import ray

    texts = pa.concat_tables(ray.get(list(refs)))
    where = pc.index_in(batch["doc_id"], value_set=texts["doc_id"])
    if where.null_count:
        raise MissingDocuments(pc.filter(batch["doc_id"], pc.is_null(where)).to_pylist(), batch.num_rows,
                               "(not among the located texts)")
    documents = texts["text"].take(where)
    return batch.drop_columns(["doc_id"]).append_column("document", documents)


def check_qrels_staged(datasets: Iterable[BeirDataset], corpus: StagedCorpus, check: InputCheck | None = None) -> None:
    """Check the qrels document ids that ``load_beir(corpus=False)`` left unchecked against the staged
    corpus (one Ray task per shard says which of them it holds): an unknown one is the error naming
    its qrels FILE:LINE, or (on_error=skip) a counted reject, as when the corpus was read with them."""
    datasets = list(datasets)
    wanted = set().union(*(ds.unchecked.doc_ids() for ds in datasets if ds.unchecked is not None))
    check_qrels_docs(datasets, corpus.holds(wanted) if wanted else set(), check)
