"""RAG on LangChain: embeddings, the index retriever (== `distributed-ir search`), reranking, chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel, FakeListLLM

from distributed_ir.models.embedder import Embedder
from distributed_ir.rag.langchain import (
    EmbedderEmbeddings,
    IndexRetriever,
    RerankerCompressor,
    build_rag_chain,
)
from distributed_ir.rag.reranker import Reranker
from tests.conftest import minilm_path, run_cli
from tests.public_fixtures import EN

FILLERS = ["The stock market closed higher on Tuesday.", "Basketball is played by two teams of five.",
           "A sonnet is a poem of fourteen lines.", "Bread rises because yeast makes gas.",
           "The violin has four strings tuned in fifths.", "Glaciers carve valleys as they move.",
           "Chess openings are studied for centuries.", "Copper conducts electricity well.",
           "Owls hunt at night with silent flight.", "The euro is used by many countries.",
           "Marathons are 42.195 kilometres long.", "Honey never spoils when sealed."]


class CosineScorer:
    """A real reranker for tests: all-MiniLM-L6-v2 cosine between query and each document."""

    def __init__(self) -> None:
        self.model = Embedder.load(minilm_path())
        self.calls = 0

    def score(self, query: str, documents: list[str]) -> list[float]:
        self.calls += 1
        q = self.model.encode([query], "query")
        return (self.model.encode(documents, "document") @ q[0]).tolist()


class Prompts(BaseCallbackHandler):
    """Records what reached the LLM (string prompts and chat messages)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.seen.extend(prompts)

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.seen.extend(m.content for batch in messages for m in batch)


def test_embedder_embeddings_apply_query_and_document_instructions(tiny_bert):
    emb = EmbedderEmbeddings(Embedder.load(tiny_bert, query_instruction="query: {}", document_instruction="passage: {}"))
    plain = Embedder.load(tiny_bert)
    q = emb.embed_query("cats purr")
    np.testing.assert_allclose(q, plain.encode(["query: cats purr"], "query")[0], atol=1e-5)
    docs = emb.embed_documents(["cats purr", "rockets fly"])
    np.testing.assert_allclose(docs, plain.encode(["passage: cats purr", "passage: rockets fly"]), atol=1e-5)
    assert isinstance(q, list) and isinstance(q[0], float) and len(q) == plain.dim
    assert not np.allclose(q, docs[0], atol=1e-3)


@pytest.fixture(scope="module")
def built_index(tiny_bert, tmp_path_factory):
    """A 20-document corpus indexed by `distributed-ir index` (Ray Data, 2 FAISS shards)."""
    root = tmp_path_factory.mktemp("rag")
    with (root / "corpus.jsonl").open("w") as fh:
        for i, (title, text, _) in enumerate(EN):
            fh.write(json.dumps({"_id": f"topic{i}", "title": title, "text": text}) + "\n")
        for i, text in enumerate(FILLERS):
            fh.write(json.dumps({"_id": f"fill{i}", "title": "", "text": text}) + "\n")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                for i, (_, _, q) in enumerate(EN)))
    res = run_cli("index", "--model", str(tiny_bert), "--corpus", str(root / "corpus.jsonl"), "--out",
                  str(root / "idx"), "--num-shards", "2", "--index-shards", "2", "--batch-size", "8",
                  "--precision", "fp32")
    assert res.returncode == 0, res.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.ray
def test_index_retriever_returns_the_cli_search_top_k(built_index):
    res = run_cli("search", "--index", str(built_index / "idx"), "--queries", str(built_index / "queries.jsonl"),
                  "--out", str(built_index / "run.trec"), "--top-k", "5", "--precision", "fp32")
    assert res.returncode == 0, res.stderr[-3000:]
    cli: dict[str, list[tuple[str, float]]] = {}
    for line in (built_index / "run.trec").read_text().splitlines():
        qid, _, doc, rank, score, _ = line.split()
        cli.setdefault(qid, []).append((doc, float(score)))
    retriever = IndexRetriever.from_index_dir(built_index / "idx", k=5, precision="fp32")
    assert len(cli) == len(EN)
    for i, (_, _, question) in enumerate(EN):
        docs = retriever.invoke(question)
        assert [d.id for d in docs] == [d for d, _ in cli[f"q{i}"]]
        np.testing.assert_allclose([d.metadata["score"] for d in docs], [s for _, s in cli[f"q{i}"]], atol=1e-5)
        assert [d.metadata["rank"] for d in docs] == [1, 2, 3, 4, 5]
    # texts and titles come from the corpus; batch search equals one-by-one
    doc = next(d for d in retriever.invoke(EN[1][2]) + retriever.search([EN[1][2]], k=20)[0] if d.id == "topic1")
    assert doc.page_content == EN[1][1] and doc.metadata["title"] == EN[1][0]
    batched = retriever.search([q for _, _, q in EN])
    assert [[d.id for d in docs] for docs in batched] == [[d for d, _ in cli[f"q{i}"]] for i in range(len(EN))]


@pytest.mark.slow
@pytest.mark.ray
def test_rerank_and_rag_chain(built_index):
    scorer = CosineScorer()
    assert isinstance(scorer, Reranker)
    # retrieve everything with the (random) tiny model; MiniLM reranking must find each topic
    retriever = IndexRetriever.from_index_dir(built_index / "idx", k=20, precision="fp32")
    compressor = RerankerCompressor(reranker=scorer, top_n=3)
    for i, (_, _, question) in enumerate(EN):
        docs = retriever.invoke(question)
        top = compressor.compress_documents(docs, question)
        assert len(top) == 3 and top[0].id == f"topic{i}", (question, [d.id for d in top])
        scores = [d.metadata["rerank_score"] for d in top]
        assert scores == sorted(scores, reverse=True) and "score" in top[0].metadata
    # the chain: retrieve -> rerank -> prompt -> LLM -> str, with a completion LLM and a chat model
    for llm in (FakeListLLM(responses=["Saturn has rings [1]."]), FakeListChatModel(responses=["Saturn has rings [1]."])):
        seen = Prompts()
        chain = build_rag_chain(retriever, llm, compressor)
        answer = chain.invoke("which planet has rings", config={"callbacks": [seen]})
        assert answer == "Saturn has rings [1]."
        prompt = seen.seen[-1]
        assert "[1] Saturn\nSaturn is the sixth planet" in prompt and "Question: which planet has rings" in prompt
        assert "[4]" not in prompt  # top_n=3 passages reach the prompt
    with pytest.raises(TypeError, match="score"):
        RerankerCompressor(reranker=object())

    class Short:
        def score(self, query, documents):
            return [1.0]

    with pytest.raises(ValueError, match="1 scores for 2 documents"):
        RerankerCompressor(reranker=Short()).compress_documents([Document("a"), Document("b")], "q")
