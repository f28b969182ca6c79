"""BM25 first stage through ``bm25s`` (sparse-matrix BM25 in NumPy; scores equal Lucene's BM25).

:meth:`BM25Index.build` splits a corpus into ``shards`` contiguous index shards (the pipeline's
:func:`search_staged` groups staged corpus shards instead), each a ``bm25s`` index of its own
(built, saved and searched independently, as the dense index shards are); a query's hits from every
shard are merged into one top-k with the project's ranking rule (:func:`~distributed_ir.eval.metrics.rank`).
Term statistics (IDF, average length) are per shard, as in a sharded Lucene/Elasticsearch index
searched without a DFS phase: with one shard the scores are exactly ``bm25s``'s. Each shard's top k
is cut by the ranking rule too (ties at rank k: doc id descending), so a run does not depend on the
order of documents inside a shard.

:func:`search_staged` is the scale-out path: each index shard is built and searched in a Ray task
from the staged corpus shards of an index folder (:mod:`distributed_ir.index.texts`), and only the
per-shard top k reaches the caller.

Defaults follow Pyserini's BEIR baseline: Lucene's BM25 with k1 = 0.9, b = 0.4, English stop
words and the Snowball English stemmer (``PyStemmer``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distributed_ir.eval.metrics import Run, rank
from distributed_ir.index.storage import Location

SETTINGS_FILE = "bm25.json"


@dataclass
class BM25Settings:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"  # a bm25s variant: lucene | robertson | atire | bm25l | bm25+
    stemmer: str = "english"  # a Snowball language, '' = no stemming
    stopwords: str = "en"  # bm25s stop-word list, '' = none

    def __post_init__(self) -> None:
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"bm25: need k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")


class BM25Index:
    """``build(corpus)`` / ``search(queries, k)`` / ``save(path)`` / ``load(path)`` over index shards."""

    def __init__(self, settings: BM25Settings, shards: list, doc_ids: list[list[str]]):
        self.settings = settings
        self.shards = shards
        self.doc_ids = doc_ids

    def _tokenize(self, texts: list[str]):
        import bm25s

        stemmer = None
        if self.settings.stemmer:
            import Stemmer

            stemmer = Stemmer.Stemmer(self.settings.stemmer)
        return bm25s.tokenize(texts, stopwords=self.settings.stopwords or None, stemmer=stemmer, show_progress=False)

    @classmethod
    def build(cls, corpus: dict[str, str], settings: BM25Settings | None = None, shards: int = 1) -> BM25Index:
        """Index ``corpus`` (doc id -> text) in ``shards`` contiguous parts."""
        ids = list(corpus)
        if not ids:
            raise ValueError("bm25: empty corpus")
        parts = [list(p) for p in np.array_split(np.array(ids, dtype=object), max(1, min(shards, len(ids))))]
        return cls.from_parts(((part, [corpus[d] for d in part]) for part in parts), settings)

    @classmethod
    def from_parts(cls, parts: Iterable[tuple[list[str], list[str]]], settings: BM25Settings | None = None
                   ) -> BM25Index:
        """One index shard per ``(doc ids, texts)`` part."""
        import bm25s

        index = cls(settings or BM25Settings(), [], [])
        for ids, texts in parts:
            model = bm25s.BM25(k1=index.settings.k1, b=index.settings.b, method=index.settings.method)
            model.index(index._tokenize(list(texts)), show_progress=False)
            index.shards.append(model)
            index.doc_ids.append(list(ids))
        return index

    def search(self, queries: dict[str, str], k: int) -> Run:
        """Top ``k`` documents per query id, merged over shards by the ranking rule (score
        descending, ties by doc id descending, as trec_eval)."""
        from bm25s.tokenization import convert_tokenized_to_string_list

        qids = list(queries)
        tokens = convert_tokenized_to_string_list(self._tokenize([queries[q] for q in qids]))
        run: Run = {q: {} for q in qids}
        for model, ids in zip(self.shards, self.doc_ids):
            names = np.array(ids, dtype=object)
            order = np.empty(len(ids), dtype=np.int64)
            order[np.argsort(names)] = np.arange(len(ids))  # each doc id's place in id order
            for qid, query in zip(qids, tokens):
                scores = model.get_scores(query) if query else np.zeros(len(ids), dtype=np.float32)
                run[qid].update((names[i], float(scores[i])) for i in top_k(scores, order, k))
        return {q: {d: hits[d] for d in rank(hits)[:k]} for q, hits in run.items()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        for n, (model, ids) in enumerate(zip(self.shards, self.doc_ids)):
            shard = path / f"shard-{n:05d}"
            model.save(str(shard), show_progress=False)
            (shard / "doc_ids.json").write_text(json.dumps(ids))
        (path / SETTINGS_FILE).write_text(json.dumps({"settings": asdict(self.settings), "shards": len(self.shards)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BM25Index:
        import bm25s

        path = Path(path)
        meta = json.loads((path / SETTINGS_FILE).read_text())
        shards, ids = [], []
        for n in range(meta["shards"]):
            shard = path / f"shard-{n:05d}"
            shards.append(bm25s.BM25.load(str(shard), show_progress=False))
            ids.append(json.loads((shard / "doc_ids.json").read_text()))
        return cls(BM25Settings(**meta["settings"]), shards, ids)


def top_k(scores: np.ndarray, id_order: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best documents by the ranking rule: score descending and, of the
    documents tied at the cut, those whose doc id sorts last (``id_order``: each document's place
    in doc id order)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = scores[np.argpartition(-scores, k - 1)[:k]].min()
    above = np.flatnonzero(scores > cut)
    tied = np.flatnonzero(scores == cut)
    need = k - len(above)
    if need < len(tied):
        tied = tied[np.argpartition(-id_order[tied], need - 1)[:need]]
    return np.concatenate([above, tied])


def search_staged(index_dir: str | Path | Location, queries: dict[str, str], k: int,
                  settings: BM25Settings | None = None, shards: int = 1,
                  timings: list[dict[str, float]] | None = None) -> Run:
    """BM25 over an index folder's staged corpus in Ray tasks: index shard ``p`` holds the staged
    corpus shards ``i`` with ``i % shards == p`` (capped at one per staged shard); each task reads
    its staged shards, builds that index shard, searches every query and returns its top ``k``;
    the hits are merged by the ranking rule. Equals :meth:`BM25Index.search` of
    :meth:`BM25Index.from_parts` over the same parts. Each task's build and search seconds are
    appended to ``timings`` when given."""
    import ray

    from distributed_ir.index.texts import StagedCorpus

    corpus = StagedCorpus(index_dir)
    files = corpus.files()
    if not files:
        raise ValueError(f"bm25: empty corpus ({corpus.stage.uri})")
    n = max(1, min(shards, len(files)))
    qref = ray.put(queries)
    task = ray.remote(num_cpus=1)(_search_part)
    run: Run = {q: {} for q in queries}
    for part, seconds in ray.get([task.remote(corpus.stage, files[p::n], settings or BM25Settings(), qref, k)
                                  for p in range(n)]):
        for q, hits in part.items():
            run[q].update(hits)
        if timings is not None:
            timings.append(seconds)
    return {q: {d: hits[d] for d in rank(hits)[:k]} for q, hits in run.items()}


def _search_part(stage: Location, files: list[str], settings: BM25Settings, queries: dict[str, str],
                 k: int) -> tuple[Run, dict[str, float]]:
    """One index shard built from the staged shard ``files`` and searched: its top ``k`` per query,
    and the seconds spent building (reading included) and searching."""
    import time

    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    ids: list[str] = []
    texts: list[str] = []
    for f in files:
        with stage.open_input(f) as fh:
            table = pq.read_table(fh, columns=["doc_id", "text"])
        ids += table["doc_id"].to_pylist()
        texts += table["text"].to_pylist()
        del table
    index = BM25Index.from_parts([(ids, texts)], settings)
    del texts
    built = time.perf_counter()
    run = index.search(queries, k)
    return run, {"index_seconds": built - t0, "search_seconds": time.perf_counter() - built}
