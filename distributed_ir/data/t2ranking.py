"""T2Ranking (THUIR, Chinese passage ranking) -> a BEIR folder + pair/triplet training records.

Public release (https://huggingface.co/datasets/THUIR/T2Ranking, folder ``data/``):

==============================  ===========================  ==============================
file                            columns (tab-separated)      rows in the release
==============================  ===========================  ==============================
collection.tsv                  pid, passage                 2,303,643
queries.{train,dev,test}.tsv    qid, query                   258,042 / 24,832 / 24,832
qrels.retrieval.{train,dev}.tsv qid, pid                     744,663 / 118,933 (positives)
qrels.{train,dev}.tsv           qid, -, pid, rel (TREC)      1,613,421 / 400,536 (graded 0-3)
==============================  ===========================  ==============================

Every file may start with a header line (the Hugging Face copy has them, the GitHub scripts
read without one). Grades: 0 not relevant, 1 on topic but not answering, 2 partly answers,
3 answers; retrieval treats 2-3 as relevant.

Output (``out_dir``): ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,dev}.tsv`` (loaded by
:func:`distributed_ir.data.beir.load_beir`), ``train_pairs.jsonl`` (one record per train query
with its positives), ``train_triplets.jsonl`` (plus judged non-relevant passages as hard
negatives, when graded train qrels exist), optional Parquet corpus shards, and
``prepare_stats.json`` with every count.

Memory: the collection is streamed once; only the ids (a bitmap) and the texts of passages
that training records need are held.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ir.data.errors import DataError
from distributed_ir.data.prepare import CorpusWriter, SeenIds, iter_tsv, write_qrels, write_queries
from distributed_ir.data.records import RecordWriter, TrainRecord

HEADERS = ("pid", "qid", "query-id", "query_id", "id")
SPLITS = ("train", "dev")


def qrels_files(input_dir: Path, split: str, source: str) -> Path:
    name = f"qrels.retrieval.{split}.tsv" if source == "retrieval" else f"qrels.{split}.tsv"
    return input_dir / name


def read_queries(path: Path, queries: dict[str, str], first_seen: dict[str, str]) -> int:
    """Add ``qid -> text`` from one queries file; a qid repeated with other text is an error."""
    n = 0
    for line, row in iter_tsv(path, ("qid", "query"), HEADERS, last_takes_rest=True):
        text = row["query"].strip()
        if not text:
            raise DataError(path, line, "empty query text", field="query")
        qid = row["qid"]
        if qid in queries and queries[qid] != text:
            raise DataError(path, line, f"query {qid!r} repeated with different text (first in {first_seen[qid]})",
                            field="qid")
        queries.setdefault(qid, text)
        first_seen.setdefault(qid, f"{path}:{line}")
        n += 1
    return n


def read_qrels(path: Path, source: str, min_relevant: int) -> list[tuple[int, str, str, int]]:
    """Rows ``(line, qid, pid, grade)``; retrieval qrels have grade ``min_relevant``."""
    rows: list[tuple[int, str, str, int]] = []
    if source == "retrieval":
        for line, row in iter_tsv(path, ("qid", "pid"), HEADERS):
            if not row["pid"].strip():
                raise DataError(path, line, "empty passage id", field="pid")
            rows.append((line, row["qid"], row["pid"].strip(), min_relevant))
    else:
        for line, row in iter_tsv(path, ("qid", "iter", "pid", "rel"), HEADERS):
            try:
                grade = int(row["rel"])
            except ValueError:
                raise DataError(path, line, f"relevance {row['rel']!r} is not an integer", field="rel") from None
            if not 0 <= grade <= 3:
                raise DataError(path, line, f"relevance {grade} outside T2Ranking's 0-3 scale", field="rel")
            rows.append((line, row["qid"], row["pid"].strip(), grade))
    return rows


@dataclass
class _Judgements:
    """Step 1: queries, each split's qrels rows ``(line, qid, pid, grade)``, and the graded train
    rows that supply judged non-relevant passages (empty without ``qrels.train.tsv``)."""

    splits: list[str]
    queries: dict[str, str]
    qrels: dict[str, list[tuple[int, str, str, int]]]
    judged_negatives: list[tuple[int, str, str, int]]

    def needed_passages(self, min_relevant: int) -> set[str]:
        """Passages whose text training records need: train positives and judged negatives."""
        needed = {pid for _, _, pid, grade in self.qrels["train"] if grade >= min_relevant}
        return needed | {pid for _, _, pid, grade in self.judged_negatives if grade < min_relevant}


@dataclass
class _Collection:
    """Step 2: every passage id (``known``), blank passages' ids (``empty``), the needed texts."""

    known: SeenIds = field(default_factory=SeenIds)
    empty: SeenIds = field(default_factory=SeenIds)
    texts: dict[str, str] = field(default_factory=dict)


def prepare_t2ranking(input_dir: str | Path, out_dir: str | Path, qrels_source: str = "retrieval",
                      min_relevant: int = 2, negatives_per_query: int = 8, num_shards: int = 0,
                      drop_unknown: bool = False, seed: int = 0) -> dict[str, Any]:
    """Convert a T2Ranking release folder; returns (and writes) the counts.

    Args:
        qrels_source: ``retrieval`` (qrels.retrieval.*.tsv, positives only, written as score 1)
            or ``graded`` (qrels.*.tsv; score = max(0, grade - min_relevant + 1), so grades below
            ``min_relevant`` become judged non-relevant 0 and nDCG keeps 3 above 2).
        negatives_per_query: cap on judged non-relevant passages per triplet record (graded
            train qrels only: ``qrels.train.tsv`` is read for them whichever source is chosen).
        num_shards: also write the corpus as this many Parquet shards (0 = none).
        drop_unknown: count and drop qrels rows naming an unknown query or passage instead of
            stopping with an error naming the line.
    """
    if qrels_source not in ("retrieval", "graded"):
        raise ValueError(f"qrels_source={qrels_source!r}: expected retrieval or graded")
    if not 1 <= min_relevant <= 3:
        raise ValueError("min_relevant must be 1, 2 or 3")
    src, out = Path(input_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"input_dir": str(src), "qrels_source": qrels_source, "min_relevant": min_relevant}
    judged = _read_judgements(src, qrels_source, min_relevant, stats)
    collection = _stream_collection(src, out, num_shards, judged.needed_passages(min_relevant), stats)
    qrels = _write_qrels_and_queries(src, out, qrels_source, min_relevant, drop_unknown, judged, collection, stats)
    _write_training_records(out, judged, collection, qrels["train"], min_relevant, negatives_per_query, seed, stats)
    (out / "prepare_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def _read_judgements(src: Path, qrels_source: str, min_relevant: int, stats: dict[str, Any]) -> _Judgements:
    """1. Queries and qrels (small): read first so the collection pass knows which texts to keep."""
    queries: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    splits = [s for s in SPLITS if (src / f"queries.{s}.tsv").is_file() or s == "train"]
    for split in splits:
        stats[f"queries_{split}"] = read_queries(src / f"queries.{split}.tsv", queries, first_seen)
    raw_qrels = {s: read_qrels(qrels_files(src, s, qrels_source), qrels_source, min_relevant) for s in splits}
    graded_train = src / "qrels.train.tsv"
    judged_negatives = read_qrels(graded_train, "graded", min_relevant) if graded_train.is_file() else []
    return _Judgements(splits, queries, raw_qrels, judged_negatives)


def _stream_collection(src: Path, out: Path, num_shards: int, needed: set[str], stats: dict[str, Any]) -> _Collection:
    """2. Stream the collection into corpus.jsonl (+ shards); keep the ids and the ``needed`` texts."""
    found = _Collection()
    stats["empty_passages"] = 0
    collection = src / "collection.tsv"
    writer = CorpusWriter(out, num_shards)
    try:
        for line, row in iter_tsv(collection, ("pid", "passage"), HEADERS, last_takes_rest=True):
            pid, text = row["pid"], row["passage"].strip()
            if pid in found.known or pid in found.empty:
                raise DataError(collection, line, f"duplicate passage id {pid!r}", field="pid")
            if not text:  # the release has a few blank passages: nothing to embed or match
                found.empty.add(pid)
                stats["empty_passages"] += 1
                continue
            found.known.add(pid)
            writer.add(pid, "", text)
            if pid in needed:
                found.texts[pid] = text
    except BaseException:
        writer.abort()
        raise
    stats["shards"] = [str(p) for p in writer.close()]
    stats["corpus_rows"] = writer.count
    return found


def _write_qrels_and_queries(src: Path, out: Path, qrels_source: str, min_relevant: int, drop_unknown: bool,
                             judged: _Judgements, collection: _Collection,
                             stats: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """3. qrels/{split}.tsv and queries.jsonl: every row is written or counted under the reason it
    was dropped.  Returns each split's kept qrels ``{qid: {pid: score}}``."""
    kept_queries: dict[str, str] = {}
    qrels_by_split: dict[str, dict[str, dict[str, int]]] = {}
    for split in judged.splits:
        path = qrels_files(src, split, qrels_source)
        qrels: dict[str, dict[str, int]] = {}
        c = {"rows": len(judged.qrels[split]), "written": 0, "duplicate": 0, "empty_passage": 0, "unknown_query": 0,
             "unknown_passage": 0}
        for line, qid, pid, grade in judged.qrels[split]:
            reason = _unknown(path, line, qid, pid, judged.queries, collection.known, collection.empty, drop_unknown)
            if reason:
                c[reason] += 1
                continue
            if pid in qrels.get(qid, {}):
                c["duplicate"] += 1
                continue
            qrels.setdefault(qid, {})[pid] = max(0, grade - min_relevant + 1)
            kept_queries[qid] = judged.queries[qid]
            c["written"] += 1
        write_qrels(out / "qrels" / f"{split}.tsv", qrels)
        qrels_by_split[split] = qrels
        stats[f"qrels_{split}"] = c
    write_queries(out / "queries.jsonl", kept_queries)
    stats["queries_written"] = len(kept_queries)
    return qrels_by_split


def _write_training_records(out: Path, judged: _Judgements, collection: _Collection,
                            train_qrels: dict[str, dict[str, int]], min_relevant: int, negatives_per_query: int,
                            seed: int, stats: dict[str, Any]) -> None:
    """4. Training records from the train split: train_pairs.jsonl, and train_triplets.jsonl with
    up to ``negatives_per_query`` judged non-relevant passages when graded train qrels exist."""
    texts = collection.texts
    negatives: dict[str, list[str]] = {}
    for _, qid, pid, grade in judged.judged_negatives:
        if grade < min_relevant and pid in texts and qid in train_qrels:
            negatives.setdefault(qid, []).append(pid)
    rng = random.Random(seed)
    pairs = RecordWriter(out / "train_pairs.jsonl", "pair")
    triplets = RecordWriter(out / "train_triplets.jsonl", "triplet") if judged.judged_negatives else None
    without_positive = 0
    for qid, docs in train_qrels.items():
        positives = [texts[p] for p, rel in docs.items() if rel > 0]
        if not positives:
            without_positive += 1
            continue
        pairs.add(TrainRecord(judged.queries[qid], positives))
        if triplets:
            pool = [p for p in dict.fromkeys(negatives.get(qid, [])) if p not in docs or docs[p] == 0]
            chosen = rng.sample(pool, min(negatives_per_query, len(pool)))
            triplets.add(TrainRecord(judged.queries[qid], positives, [texts[p] for p in chosen]))
    pairs.close()
    stats["train_pairs"] = pairs.count
    stats["train_queries_without_positive"] = without_positive
    if triplets:
        triplets.close()
        stats["train_triplets"] = triplets.count


def _unknown(path: Path, line: int, qid: str, pid: str, queries: dict[str, str], known: SeenIds, empty: SeenIds,
             drop: bool) -> str | None:
    """Why a qrels row cannot be kept (None when it can); unknown ids stop unless ``drop``."""
    if pid in empty:
        return "empty_passage"
    if qid not in queries:
        if not drop:
            raise DataError(path, line, f"unknown query id {qid!r} (not in any queries.*.tsv)", field="qid")
        return "unknown_query"
    if pid not in known:
        if not drop:
            raise DataError(path, line, f"unknown passage id {pid!r} (not in collection.tsv)", field="pid")
        return "unknown_passage"
    return None
