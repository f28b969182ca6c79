"""BM25 first stage through ``bm25s`` (sparse-matrix BM25 in NumPy; scores equal Lucene's BM25).

The corpus is split into ``shards`` contiguous index shards, each a ``bm25s`` index of its own
(built, saved and searched independently, as the dense index shards are); a query's hits from every
shard are merged into one top-k with the project's ranking rule (:func:`~distributed_ir.eval.metrics.rank`).
Term statistics (IDF, average length) are per shard, as in a sharded Lucene/Elasticsearch index
searched without a DFS phase: with one shard the scores are exactly ``bm25s``'s.

Defaults follow Pyserini's BEIR baseline: Lucene's BM25 with k1 = 0.9, b = 0.4, English stop
words and the Snowball English stemmer (``PyStemmer``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distributed_ir.eval.metrics import Run, rank

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
        import bm25s

        settings = settings or BM25Settings()
        ids = list(corpus)
        if not ids:
            raise ValueError("bm25: empty corpus")
        parts = [list(p) for p in np.array_split(np.array(ids, dtype=object), max(1, min(shards, len(ids))))]
        index = cls(settings, [], parts)
        for part in parts:
            model = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
            model.index(index._tokenize([corpus[d] for d in part]), show_progress=False)
            index.shards.append(model)
        return index

    def search(self, queries: dict[str, str], k: int) -> Run:
        """Top ``k`` documents per query id, merged over shards (ties: doc id descending, as trec_eval)."""
        qids = list(queries)
        tokens = self._tokenize([queries[q] for q in qids])
        run: Run = {q: {} for q in qids}
        for model, ids in zip(self.shards, self.doc_ids):
            docs, scores = model.retrieve(tokens, k=min(k, len(ids)), show_progress=False, n_threads=1)
            for row, qid in enumerate(qids):
                run[qid].update((ids[int(d)], float(s)) for d, s in zip(docs[row], scores[row]))
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
