"""Pooling, instructions, self-describing checkpoints and sentence-transformers compatibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distributed_ir.config import ModelConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.models.embedder import Embedder
from distributed_ir.models.pooling import last_token_index, pool
from tests.conftest import build_tiny_model, minilm_path

TEXTS = ["a short one", "a considerably longer sentence about protein folding in yeast cells", "x y"]


def test_pool_modes_by_hand():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    assert torch.allclose(pool(hidden, right, "mean")[1], hidden[1, :2].mean(0))
    assert last_token_index(right).tolist() == [2, 1]
    assert last_token_index(left).tolist() == [3, 3]
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, right, "max")


@pytest.mark.parametrize("append_eos", [False, True])
def test_last_token_pooling_same_for_left_and_right_padding(tmp_path, append_eos):
    """A decoder embedder gives the same vectors whichever side the tokenizer pads."""
    vecs = {}
    for side in ("left", "right"):
        path = build_tiny_model(tmp_path / side, "qwen2", padding_side=side)
        emb = Embedder.from_config(ModelConfig(name_or_path=str(path), pooling="last", append_eos=append_eos))
        batch = emb.tokenize(TEXTS, "document")
        pad_col = 0 if side == "left" else -1
        assert (batch["attention_mask"][:, pad_col] == 0).any(), "batch must actually be padded on " + side
        if append_eos:  # the last real token of every row is EOS
            idx = last_token_index(batch["attention_mask"])
            assert (batch["input_ids"][torch.arange(3), idx] == emb.tokenizer.eos_token_id).all()
        vecs[side] = emb.encode(TEXTS, "document", batch_size=8)
    np.testing.assert_allclose(vecs["left"], vecs["right"], atol=1e-5)


def test_instruction_template_applied_and_required(tiny_bert):
    emb = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert), query_instruction="Query: {} ?"))
    assert emb.format(["cats"], "query") == ["Query: cats ?"]
    assert emb.format(["cats"], "document") == ["cats"]
    with pytest.raises(ConfigError, match=r"needs exactly one '\{\}'"):
        ModelConfig(name_or_path=str(tiny_bert), query_instruction="Represent this query")


def test_save_load_keeps_settings_and_refuses_conflicts(tiny_bert, tmp_path):
    emb = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert), pooling="cls", normalize=False,
                                           query_instruction="q: {}", query_max_length=16, document_max_length=40))
    emb.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "distributed_ir.json").read_text())
    assert saved["settings"]["pooling"] == "cls" and saved["similarity"] == "dot"
    loaded = Embedder.load(tmp_path / "m")
    assert loaded.settings == emb.settings
    np.testing.assert_allclose(loaded.encode(TEXTS, "query"), emb.encode(TEXTS, "query"), atol=1e-6)
    with pytest.raises(ConfigError, match="pooling='mean' conflicts with the checkpoint"):
        Embedder.load(tmp_path / "m", pooling="mean")
    with pytest.raises(ConfigError, match="query_instruction"):
        Embedder.load(tmp_path / "m", query_instruction="query: {}")
    # a limit is not a meaning: max lengths may be changed at encode time
    assert Embedder.load(tmp_path / "m", document_max_length=20).settings.document_max_length == 20


def test_missing_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="never downloads"):
        Embedder.from_config(ModelConfig(name_or_path="sentence-transformers/all-MiniLM-L6-v2"))


@pytest.mark.slow
def test_sentence_transformers_loads_saved_model_with_same_vectors(tmp_path):
    """Real all-MiniLM-L6-v2, with a query prompt: SentenceTransformer(path) == our encode (1e-5)."""
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_config(ModelConfig(name_or_path="default", query_instruction="query: {}",
                                           document_instruction="passage: {}"))
    assert emb.settings.pooling == "mean" and emb.settings.normalize and emb.settings.document_max_length == 256
    emb.save(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    for kind, prompt in (("query", "query"), ("document", "document")):
        ours = emb.encode(TEXTS, kind)
        theirs = st.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and the bundled model itself matches sentence-transformers without prompts
    base = Embedder.from_config(ModelConfig(name_or_path="default"))
    np.testing.assert_allclose(base.encode(TEXTS), SentenceTransformer(minilm_path(), device="cpu").encode(TEXTS),
                               atol=1e-5)


LONG = ["a very long query about cats and dogs and rockets " * 12, "short one", "bread needs yeast " * 30]


@pytest.mark.slow
@pytest.mark.parametrize("instruction", ["{}", "Query: {}"])
def test_sentence_transformers_loads_llm_embedder_with_eos_and_per_kind_lengths(tmp_path, instruction):
    """A last-token-pooled embedder with append_eos (tiny Qwen2): SentenceTransformer(path)'s
    encode_query / encode_document equal ours, on texts longer than either max length."""
    from sentence_transformers import SentenceTransformer

    from tests.conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "qwen", "qwen2", padding_side="left")
    emb = Embedder.from_config(ModelConfig(name_or_path=str(model), query_instruction=instruction,
                                           query_max_length=12, document_max_length=40))
    assert emb.settings.append_eos and emb.settings.pooling == "last"
    ids = emb.tokenize(LONG, "query")["input_ids"]
    assert ids.shape[1] == 12 and (ids[:, -1] == emb.tokenizer.eos_token_id).all()
    emb.save(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    np.testing.assert_allclose(st.encode_query(LONG), emb.encode(LONG, "query"), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(LONG), emb.encode(LONG, "document"), atol=1e-5)
    # and the folder reloads here with the same settings and vectors (EOS not appended twice)
    again = Embedder.load(tmp_path / "st")
    assert again.settings == emb.settings
    np.testing.assert_allclose(again.encode(LONG, "query"), emb.encode(LONG, "query"), atol=1e-6)


def test_encode_tokenising_ahead_in_threads_keeps_vectors_and_order(tiny_bert, monkeypatch):
    """On a GPU ``encode`` tokenises in threads ahead of the forward passes and copies to the host
    in blocks (``Embedder.tokenize_threads``, ``FLUSH_ROWS``): same vectors, same order as in line."""
    import threading

    import distributed_ir.models.embedder as embedder_module

    emb = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert)))
    assert emb._tokenize_threads(torch.device("cpu")) == 0  # CPU default: the cores run the forward
    texts = [f"text {i} " + "word " * (i * 7 % 23) for i in range(50)]
    emb.tokenize_threads = 0
    inline = emb.encode(texts, "document", batch_size=4)
    seen = []
    tokenize = emb.tokenize

    def spy(batch, kind):
        seen.append(threading.current_thread().name)
        return tokenize(batch, kind)

    monkeypatch.setattr(emb, "tokenize", spy)
    monkeypatch.setattr(embedder_module, "FLUSH_ROWS", 6)  # several copies to the host, not one
    emb.tokenize_threads = 2
    ahead = emb.encode(texts, "document", batch_size=4)
    assert len(seen) == 13 and all(name.startswith("tokenize") for name in seen)
    np.testing.assert_array_equal(ahead, inline)
    for i in (0, 17, 49):  # row i is text i's vector
        np.testing.assert_allclose(ahead[i], emb.encode([texts[i]], "document")[0], atol=1e-5)
