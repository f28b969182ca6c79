"""BEIR datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

Every reader validates as it goes and raises :class:`DataError` naming file and line for
malformed JSON, missing/empty ids, duplicate ids, wrong types, invalid UTF-8 and qrels that name
unknown queries or documents; with ``InputCheck(on_error="skip")`` bad rows go to a rejects
file instead (see :mod:`distributed_ir.data.intake`).  Graded relevance is kept as an int
(0 = judged non-relevant).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck, iter_jsonl

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
_PLAIN_NAME = re.compile(r"[\w.-]+")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a dataset or split name, or None when it can.

    Such names are joined into paths (``data_dir/<dataset>``, ``qrels/<split>.tsv``) and come from
    configs and command lines: each must be one plain path component, never ``.`` or ``..``.
    """
    if isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and name not in (".", ".."):
        return None
    return (f"{name!r} is not a plain name: use letters, digits, '_', '.' and '-' "
            "(no path separators, not '.' or '..')")


def _id(path: str | Path, lineno: int, obj: dict) -> str:
    if "_id" not in obj:
        raise DataError(path, lineno, "missing", field="_id")
    value = obj["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, lineno, f"expected a string id, got {type(value).__name__}", field="_id")
    value = str(value)
    if not value.strip():
        raise DataError(path, lineno, "empty id", field="_id")
    return value


def _text(path: str | Path, lineno: int, obj: dict, name: str, required: bool) -> str:
    value = obj.get(name, None)
    if value is None:
        if required:
            raise DataError(path, lineno, "missing", field=name)
        return ""
    if not isinstance(value, str):
        raise DataError(path, lineno, f"expected a string, got {type(value).__name__}", field=name)
    return value


def document_text(path: str | Path, lineno: int, obj: dict) -> str:
    """BEIR's ``"title text"`` for one corpus row; blank documents are errors."""
    title = _text(path, lineno, obj, "title", required=False)
    text = f"{title} {_text(path, lineno, obj, 'text', required=True)}".strip()
    if not text:
        raise DataError(path, lineno, "empty document (title and text are blank)", field="text")
    return text


def query_text(path: str | Path, lineno: int, obj: dict) -> str:
    text = _text(path, lineno, obj, "text", required=True)
    if not text.strip():
        raise DataError(path, lineno, "empty query text", field="text")
    return text


def _load_texts(path: str | Path, make_text, check: InputCheck | None) -> dict[str, str]:
    """Map id -> ``make_text(row)`` in file order; a repeated id names its first line."""
    check = check or InputCheck()
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path, check):
        try:
            key = _id(path, lineno, obj)
            if key in texts:
                raise DataError(path, lineno, f"duplicate id {key!r} (first on line {first_line[key]})", field="_id")
            text = make_text(path, lineno, obj)
        except DataError as e:
            check.reject(e, obj)
            continue
        texts[key] = text
        first_line[key] = lineno
        check.accept(path)
    return texts


def load_corpus(path: str | Path, check: InputCheck | None = None) -> dict[str, str]:
    """Map doc id -> ``"title text"`` (BEIR's convention), in file order."""
    return _load_texts(path, document_text, check)


def load_queries(path: str | Path, check: InputCheck | None = None) -> dict[str, str]:
    """Map query id -> query text, in file order."""
    return _load_texts(path, query_text, check)


def load_qrels(
    path: str | Path,
    queries: Container[str] | None = None,
    corpus: Container[str] | None = None,
    check: InputCheck | None = None,
    unchecked: list[QrelsRow] | None = None,
) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score`` with a header line).

    Also accepts TREC qrels (``qid 0 docid rel``, whitespace separated).  When ``queries`` /
    ``corpus`` are given, a row naming an unknown id is an error naming its line.  ``unchecked``
    (a list, corpus not given): the rows are kept there, not yet accepted, for
    :func:`check_qrels_docs` to check their document ids once the corpus's are known.
    """
    check = check or InputCheck()
    qrels: dict[str, dict[str, int]] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if lineno == 1 and raw.split(maxsplit=1)[0].strip().lower() in (b"query-id", b"qid", b"query_id"):
                continue  # the header is not a row
            check.read(path)
            try:
                qid, doc_id, rel = _qrels_row(path, lineno, raw, queries, corpus)
            except DataError as e:
                if unchecked is not None and check.on_error == "skip":  # rejected in line order, later
                    unchecked.append(QrelsRow(lineno, "", "", 0, raw, e))
                    continue
                check.reject(e, raw)
                continue
            qrels.setdefault(qid, {})[doc_id] = rel
            if unchecked is None:
                check.accept(path)
            else:
                unchecked.append(QrelsRow(lineno, qid, doc_id, rel, raw if check.on_error == "skip" else None))
    return qrels


def unknown_document(path: str | Path, lineno: int, doc_id: str) -> DataError:
    """The error of a qrels row whose document the corpus lacks."""
    return DataError(path, lineno, f"unknown document id {doc_id!r}", field="corpus-id")


def _qrels_row(path: str | Path, lineno: int, raw: bytes, queries: Container[str] | None,
               corpus: Container[str] | None) -> tuple[str, str, int]:
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(path, lineno, f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    cols = line.split("\t") if "\t" in line else line.split()
    if len(cols) == 4:  # TREC format: qid iter docid rel
        cols = [cols[0], cols[2], cols[3]]
    if len(cols) != 3:
        raise DataError(path, lineno, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}")
    qid, doc_id, score = (c.strip() for c in cols)
    if not qid:
        raise DataError(path, lineno, "empty query id", field="query-id")
    if not doc_id:
        raise DataError(path, lineno, "empty document id", field="corpus-id")
    try:
        rel = int(score)
    except ValueError:
        raise DataError(path, lineno, f"relevance {score!r} is not an integer", field="score") from None
    if queries is not None and qid not in queries:
        raise DataError(path, lineno, f"unknown query id {qid!r}", field="query-id")
    if corpus is not None and doc_id not in corpus:
        raise unknown_document(path, lineno, doc_id)
    return qid, doc_id, rel


class QrelsRow(NamedTuple):
    """A qrels row read before the corpus (``load_beir(corpus=False)``): its document id is checked
    later; ``error``: a problem already found (kept to be rejected in line order, on_error=skip);
    ``raw``: the row for the rejects file (on_error=skip only)."""

    line: int
    qid: str
    doc_id: str
    rel: int
    raw: bytes | None = None
    error: DataError | None = None


@dataclass
class UncheckedQrels:
    """A qrels file's rows, in file order, whose document ids wait for the corpus (see :func:`check_qrels_docs`)."""

    path: str
    rows: list[QrelsRow]

    def doc_ids(self) -> set[str]:
        return {r.doc_id for r in self.rows if r.error is None}


@dataclass
class BeirDataset:
    """A BEIR split. ``corpus`` is None when loaded without the texts (``load_beir(corpus=False)``):
    the corpus is then read where it is needed (e.g. an index folder's staged corpus), and
    ``unchecked`` holds the qrels rows until :func:`check_qrels_docs` checks their document ids."""

    corpus: dict[str, str] | None
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    unchecked: UncheckedQrels | None = None

    def split_queries(self) -> dict[str, str]:
        """Queries that appear in this split's qrels, in query-file order."""
        return {qid: text for qid, text in self.queries.items() if qid in self.qrels}


def check_qrels_docs(datasets: Iterable[BeirDataset], known: Container[str], check: InputCheck | None = None) -> None:
    """Finish what ``load_beir(corpus=False)`` left open: each unchecked qrels row is accepted when
    ``known`` (the corpus's ids, or the part of them the qrels name) holds its document, else it
    gets :func:`load_qrels`'s treatment of an unknown document (the error naming its FILE:LINE, or a
    reject), in file order. The counts and the qrels then equal those of a load with the corpus."""
    check = check or InputCheck()
    for ds in datasets:
        if ds.unchecked is None:
            continue
        path, kept, dropped = ds.unchecked.path, [], False
        for row in ds.unchecked.rows:
            error = row.error
            if error is None and row.doc_id not in known:
                error, dropped = unknown_document(path, row.line, row.doc_id), True
            if error is not None:
                check.reject(error, row.raw)
                continue
            check.accept(path)
            kept.append(row)
        if dropped:  # rebuilt as a load with the corpus builds it (same keys, same order)
            ds.qrels = {}
            for row in kept:
                ds.qrels.setdefault(row.qid, {})[row.doc_id] = row.rel
        ds.unchecked = None


def resolve_data_dir(data_dir: str | None) -> Path:
    """``data_dir`` or ``$IR_DATA_DIR``; error when neither is set."""
    value = data_dir or os.environ.get("IR_DATA_DIR", "")
    if not value:
        raise DataError("IR_DATA_DIR", None, "no data folder: set IR_DATA_DIR or pass --data / data_dir=")
    return Path(value)


def load_beir(folder: str | Path, split: str, base: BeirDataset | None = None,
              check: InputCheck | None = None, corpus: bool = True) -> BeirDataset:
    """Load a BEIR dataset folder and one qrels split, cross-checking ids.

    Pass ``base`` (another split of the same folder) to reuse its corpus and queries.
    ``corpus=False``: the corpus is not read here (only its file's presence is checked) and no
    text is kept (``BeirDataset.corpus`` is None); the qrels' document ids are checked later,
    where the corpus is read (:func:`check_qrels_docs`, e.g. on the staged shards by
    :func:`distributed_ir.index.texts.check_qrels_staged`): until then ``unchecked`` holds the rows.
    """
    return load_beir_splits(folder, [split], base, check, corpus)[0]


def load_beir_splits(folder: str | Path, splits: list[str], base: BeirDataset | None = None,
                     check: InputCheck | None = None, corpus: bool = True) -> list[BeirDataset]:
    """:func:`load_beir` for several qrels splits of one folder, sharing one read of the corpus and queries."""
    folder = Path(folder)
    for split in splits:
        problem = name_problem(split)
        if problem:
            raise DataError(folder, None, problem, field="split")
    missing = [p for p in ("corpus.jsonl", "queries.jsonl", *(f"qrels/{s}.tsv" for s in splits))
               if not (folder / p).is_file()]
    if missing:
        raise DataError(
            folder, None,
            f"not a BEIR dataset folder: missing {', '.join(missing)}. Put the BEIR files there "
            f"(corpus.jsonl, queries.jsonl, qrels/{splits[0]}.tsv) or let `distributed-ir pipeline` "
            "download them on an online machine",
        )
    texts = base.corpus if base else (load_corpus(folder / "corpus.jsonl", check) if corpus else None)
    queries = base.queries if base else load_queries(folder / "queries.jsonl", check)
    datasets = []
    for split in splits:
        path = folder / "qrels" / f"{split}.tsv"
        rows: list[QrelsRow] | None = None if texts is not None else []
        qrels = load_qrels(path, queries=queries, corpus=texts, check=check, unchecked=rows)
        datasets.append(BeirDataset(corpus=texts, queries=queries, qrels=qrels,
                                    unchecked=None if rows is None else UncheckedQrels(str(path), rows)))
    return datasets


def ensure_beir(data_dir: Path, name: str) -> Path:
    """Return ``data_dir/name``; download BEIR's public zip there if it is missing.

    Offline, the error says exactly which files to put where.
    """
    problem = name_problem(name)
    if problem:
        raise DataError(data_dir, None, problem, field="dataset")
    folder = data_dir / name
    if (folder / "corpus.jsonl").is_file():
        return folder
    url = BEIR_URL.format(name=name)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            archive = Path(tmp) / f"{name}.zip"
            with urllib.request.urlopen(url, timeout=30) as resp, archive.open("wb") as out:
                shutil.copyfileobj(resp, out)
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():  # never extract outside tmp
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DataError(url, None, f"unsafe path in archive: {member}")
                zf.extractall(tmp)
            os.replace(Path(tmp) / name, folder)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(
            folder, None,
            f"BEIR dataset {name!r} is not here and could not be downloaded from {url} ({e}). "
            f"Offline: download that zip elsewhere and unpack it so that {folder}/corpus.jsonl, "
            f"{folder}/queries.jsonl and {folder}/qrels/test.tsv exist, then set IR_DATA_DIR={data_dir}",
        ) from None
    return folder
