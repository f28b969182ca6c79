"""LangChain adapters over distributed-ir models and indexes, and a small RAG chain (LCEL).

- :class:`EmbedderEmbeddings`: ``Embeddings`` backed by :class:`~distributed_ir.models.embedder.Embedder`
  (queries get the model's query instruction, documents its document instruction).
- :class:`IndexRetriever`: ``BaseRetriever`` over an index folder built by ``distributed-ir index``;
  it encodes and searches as ``distributed-ir search`` does, in its own process (same EncodeStage,
  same searcher :class:`~distributed_ir.index.parts.PartSearcher`, same ranking rule), so ids and
  scores agree with the CLI's TREC run.
- :class:`RerankerCompressor`: ``BaseDocumentCompressor`` re-ordering documents with any
  :class:`~distributed_ir.rag.reranker.Reranker`.
- :func:`build_rag_chain`: question -> retrieve -> rerank -> prompt -> LLM -> str.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import BasePromptTemplate, PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnablePassthrough
from pydantic import ConfigDict, PrivateAttr

from distributed_ir.data.beir import _id, _text, iter_jsonl
from distributed_ir.data.errors import DataError
from distributed_ir.eval.metrics import rank
from distributed_ir.index.corpus import expand_corpus
from distributed_ir.rag.reranker import Reranker


class EmbedderEmbeddings(Embeddings):
    """LangChain embeddings from a distributed-ir embedder (its saved instructions apply)."""

    def __init__(self, embedder: Any, batch_size: int = 64, bf16: bool = False):
        self.embedder = embedder
        self.batch_size = batch_size
        self.bf16 = bf16

    @classmethod
    def from_path(cls, path: str, **kwargs: Any) -> EmbedderEmbeddings:
        from distributed_ir.models.embedder import Embedder

        return cls(Embedder.load(path), **kwargs)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.encode(list(texts), "document", self.batch_size, self.bf16).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.encode([text], "query", self.batch_size, self.bf16)[0].tolist()


def load_corpus_fields(paths: Sequence[str | Path]) -> dict[str, tuple[str, str]]:
    """``doc_id -> (title, text)`` from BEIR JSONL / Parquet corpus files (ids validated)."""
    docs: dict[str, tuple[str, str]] = {}
    for path in expand_corpus([str(p) for p in paths]):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = enumerate(pq.read_table(path).to_pylist(), start=1)
        else:
            rows = iter_jsonl(path)
        for line, row in rows:
            if "_id" not in row and "doc_id" in row:
                row["_id"] = row["doc_id"]
            doc_id = _id(path, line, row)
            docs[doc_id] = (_text(path, line, row, "title", False), _text(path, line, row, "text", True))
    return docs


class IndexRetriever(BaseRetriever):
    """Top-k documents from a ``distributed-ir index`` folder, scores in ``metadata["score"]``.

    Build with :meth:`from_index_dir`. Each Document has ``id`` = the corpus id,
    ``page_content`` = the document text, and metadata ``doc_id``, ``title``, ``score`` (inner
    product, cosine for normalised models) and ``rank`` (1-based).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    k: int = 10
    index_dir: str
    _searcher: Any = PrivateAttr(default=None)
    _stage: Any = PrivateAttr(default=None)
    _docs: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_index_dir(cls, index_dir: str | Path, k: int = 10, corpus: Sequence[str | Path] | None = None,
                       precision: str = "auto", use_gpu: bool = False, batch_size: int = 64) -> IndexRetriever:
        """Load the FAISS shards, the model that built them and the corpus texts.

        ``corpus`` defaults to the files the index was built from (its manifest); all texts are
        held in memory, so pass a smaller lookup set for very large corpora.
        """
        from distributed_ir.index.encode import EncodeStage
        from distributed_ir.index.parts import PartSearcher
        from distributed_ir.index.pipeline import MANIFEST

        root = Path(index_dir)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(root, None, f"no {MANIFEST}: not an index folder built by `distributed-ir index`")
        manifest = json.loads(manifest_path.read_text())
        retriever = cls(k=k, index_dir=str(root))
        retriever._searcher = PartSearcher(root / "index", use_gpu=use_gpu)
        retriever._stage = EncodeStage(manifest["model"], kind="query", batch_size=batch_size, precision=precision,
                                       device="cuda" if use_gpu else "cpu")
        retriever._docs = load_corpus_fields(corpus or manifest["corpus"])
        missing = [d for d in islice(retriever._searcher.doc_ids(), 1000) if d not in retriever._docs]
        if missing:
            raise DataError(root, None, f"corpus lacks indexed documents, e.g. {missing[:3]}: pass the corpus the "
                                        "index was built from")
        return retriever

    def search(self, queries: list[str], k: int | None = None) -> list[list[Document]]:
        """Batched retrieval: one encode and one search of the parts for all queries, in this
        process, by the retrieval core's searcher (what ``search``'s actors run)."""
        from distributed_ir.index.parts import hit_dicts

        out = []
        for hits in hit_dicts(self._searcher.search(self._stage.encode(queries), k or self.k)):
            docs = []
            for position, doc_id in enumerate(rank(hits), 1):  # the project's one ranking rule (ties too)
                title, text = self._docs[doc_id]
                docs.append(Document(id=doc_id, page_content=text, metadata={
                    "doc_id": doc_id, "title": title, "score": hits[doc_id], "rank": position}))
            out.append(docs)
        return out

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self.search([query])[0]


class RerankerCompressor(BaseDocumentCompressor):
    """Re-order retrieved documents by a reranker's score; keep the best ``top_n``.

    The reranker sees ``"title text"`` when a document has a title (what the index embedded).
    Output documents are copies with ``metadata["rerank_score"]``; the retrieval score and rank
    stay in ``score`` / ``rank``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    reranker: Any
    top_n: int | None = None
    include_title: bool = True

    def model_post_init(self, context: Any) -> None:
        if not isinstance(self.reranker, Reranker):
            raise TypeError(f"{type(self.reranker).__name__} has no score(query, documents) method")

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        texts = [f"{d.metadata['title']} {d.page_content}".strip() if self.include_title and d.metadata.get("title")
                 else d.page_content for d in documents]
        scores = list(self.reranker.score(query, texts))
        if len(scores) != len(documents):
            raise ValueError(f"{type(self.reranker).__name__}.score returned {len(scores)} scores "
                             f"for {len(documents)} documents")
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))  # stable: ties keep retrieval order
        out = []
        for i in order[: self.top_n]:
            doc = documents[i]
            out.append(Document(id=doc.id, page_content=doc.page_content,
                                metadata={**doc.metadata, "rerank_score": float(scores[i])}))
        return out


DEFAULT_PROMPT = PromptTemplate.from_template(
    "Answer the question using only the numbered passages below. Cite passages like [1].\n\n"
    "{context}\n\nQuestion: {question}\nAnswer:"
)


def format_documents(docs: Sequence[Document]) -> str:
    """Numbered passages, ``[n] title`` then the text."""
    parts = []
    for n, d in enumerate(docs, 1):
        title = d.metadata.get("title")
        parts.append(f"[{n}] {title}\n{d.page_content}" if title else f"[{n}] {d.page_content}")
    return "\n\n".join(parts)


def build_rag_chain(retriever: BaseRetriever, llm: BaseLanguageModel | Runnable,
                    compressor: BaseDocumentCompressor | None = None,
                    prompt: BasePromptTemplate = DEFAULT_PROMPT) -> Runnable:
    """``question: str -> answer: str``: retrieve -> (rerank) -> prompt -> LLM -> text.

    Any LangChain LLM or chat model plugs in; the prompt needs ``{context}`` and ``{question}``.
    """

    def retrieve(question: str, config: RunnableConfig) -> list[Document]:
        docs = retriever.invoke(question, config)
        if compressor is not None:
            docs = list(compressor.compress_documents(docs, question, callbacks=config.get("callbacks")))
        return docs

    context = RunnableLambda(retrieve).with_config(run_name="retrieve_and_rerank") | RunnableLambda(format_documents)
    return {"context": context, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
