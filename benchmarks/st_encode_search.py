"""The script a user would write without distributed-ir: sentence-transformers fp32 encode + FAISS search.

Loads the model, encodes a BEIR corpus (``title text``, batch 64, normalised, fp32) and the
queries of a qrels file, searches a flat inner-product FAISS index and writes a TREC run.
``benchmarks/index_vs_st.py`` times this whole script against ``distributed-ir index`` (+ search).

    python benchmarks/st_encode_search.py --model MODEL_DIR --corpus corpus.jsonl \
        --queries queries.jsonl --qrels qrels/test.tsv --out st.trec
"""

from __future__ import annotations

import argparse
import csv
import json

import faiss
import numpy as np
from sentence_transformers import SentenceTransformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--qrels", required=True, help="only the queries judged here are searched")
    ap.add_argument("--out", required=True)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    ids, docs = [], []
    with open(args.corpus) as fh:
        for line in fh:
            r = json.loads(line)
            ids.append(r["_id"])
            docs.append(f"{r.get('title', '')} {r['text']}".strip())
    with open(args.qrels) as fh:
        judged = {row[0] for row in csv.reader(fh, delimiter="\t")}
    queries = {}
    with open(args.queries) as fh:
        for line in fh:
            r = json.loads(line)
            if r["_id"] in judged:
                queries[r["_id"]] = r["text"]
    model = SentenceTransformer(args.model, device="cpu")
    vectors = model.encode(docs, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    qids = list(queries)
    qvec = model.encode([queries[q] for q in qids], batch_size=args.batch_size, normalize_embeddings=True,
                        convert_to_numpy=True)
    scores, positions = index.search(np.ascontiguousarray(qvec, dtype=np.float32), min(args.top_k, len(ids)))
    with open(args.out, "w") as fh:
        for qid, srow, prow in zip(qids, scores, positions):
            for rank, (s, p) in enumerate(zip(srow, prow), 1):
                fh.write(f"{qid} Q0 {ids[p]} {rank} {float(s)!r} st\n")


if __name__ == "__main__":
    main()
