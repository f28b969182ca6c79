"""The three rerankers on tiny models built in code: scores, chunking, padding, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distributed_ir.models.colbert import ColBERTReranker, maxsim
from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.models.reranker_base import window_starts
from distributed_ir.models.rerankers import load_reranker
from distributed_ir.rag.reranker import Reranker
from tests.conftest import build_tiny_model

QUERIES = ["what do cats do", "how do rockets fly", "why is the sky blue"]
DOCS = ["cats purr and sleep most of the day " * 3, "rockets burn fuel to reach orbit",
        "rayleigh scattering of sunlight " * 12]
LONG = " ".join(f"word{i}" for i in range(300)) + " cats purr loudly at the very end"


def test_window_starts_cover_and_overlap():
    assert window_starts(10, 20, 4, 8) == [0]
    starts = window_starts(100, 30, 10, 8)
    assert starts == [0, 20, 40, 60, 80] and starts[-1] + 30 >= 100
    assert window_starts(100, 30, 10, 2) == [0, 20]
    assert window_starts(100, 30, 10, 1) == [0]


def test_cross_encoder_matches_sentence_transformers(tiny_bert, tmp_path):
    from sentence_transformers import CrossEncoder

    model = CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48)
    assert isinstance(model, Reranker)
    ours = model.score_pairs(QUERIES, DOCS, batch_size=2)
    path = model.save(tmp_path / "ce")
    st = CrossEncoder(str(path), device="cpu").predict(list(zip(QUERIES, DOCS)), batch_size=32)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    again = load_reranker(path)
    assert isinstance(again, CrossEncoderReranker) and again.settings.max_length == 48
    np.testing.assert_allclose(again.score(QUERIES[0], DOCS), model.score(QUERIES[0], DOCS), atol=1e-6)
    # the batch order (length sorting) does not change a score
    np.testing.assert_allclose(model.score_pairs(QUERIES[::-1], DOCS[::-1], batch_size=1), ours[::-1], atol=1e-5)


def test_settings_belong_to_the_models_and_the_config_extends_them(tiny_bert, tmp_path):
    """One RerankerSettings (models): ValueError on bad values, which the config reports as a ConfigError;
    the config's `reranker:` section adds head_lr, which a saved model never carries."""
    from distributed_ir.config import TrainConfig
    from distributed_ir.config_loader import ConfigError, load_config, to_dict
    from distributed_ir.models.settings import DEFAULT_LLM_PROMPT, SETTINGS_FILE, RerankerSettings

    with pytest.raises(ValueError, match=r"reranker\.max_chunks=0: must be >= 1"):
        RerankerSettings(max_chunks=0)
    with pytest.raises(ConfigError, match=r"reranker\.chunk_overlap=-1: must be >= 0"):
        load_config(TrainConfig, None, ["task=colbert", "reranker.chunk_overlap=-1"])
    # the YAML keys of the `reranker:` section
    assert set(to_dict(TrainConfig())["reranker"]) == {"max_length", "query_max_length", "document_max_length",
                                                       "max_chunks", "chunk_overlap", "colbert_dim", "prompt",
                                                       "head_lr"}
    cfg = load_config(TrainConfig, None, ["task=cross_encoder", "reranker.max_length=48", "reranker.head_lr=1e-3",
                                          "reranker.prompt="])
    assert cfg.reranker.prompt == DEFAULT_LLM_PROMPT  # '' = the default prompt
    model = CrossEncoderReranker.from_pretrained(str(tiny_bert), settings=cfg.reranker)
    assert type(model.settings) is RerankerSettings and model.settings.max_length == 48
    saved = json.loads((model.save(tmp_path / "ce") / SETTINGS_FILE).read_text())["reranker"]
    assert saved["kind"] == "cross_encoder" and saved["max_length"] == 48 and "head_lr" not in saved
    assert load_reranker(tmp_path / "ce").settings == model.settings


def test_load_reranker_refuses_an_embedder_and_an_unknown_kind(tiny_bert, tmp_path):
    from distributed_ir.models.embedder import Embedder
    from distributed_ir.models.settings import SETTINGS_FILE

    Embedder.load(str(tiny_bert)).save(tmp_path / "emb")
    with pytest.raises(ValueError, match="not a reranker checkpoint"):
        load_reranker(tmp_path / "emb")
    path = CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48).save(tmp_path / "ce")
    saved = json.loads((path / SETTINGS_FILE).read_text())
    saved["reranker"]["kind"] = "splade"
    (path / SETTINGS_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="reranker kind 'splade'; expected one of cross_encoder, colbert, llm_reranker"):
        load_reranker(path)


def test_cross_encoder_long_document_is_max_over_chunks(tiny_bert):
    model = CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=64, max_chunks=64, chunk_overlap=8)
    units, owners = model.build_units(["cats purr"], [LONG])
    assert len(units) > 4 and set(owners) == {0}
    assert all(len(u["input_ids"]) <= 64 for u in units)
    chunk_scores = model.score_units(units).detach().numpy()
    assert model.score_pairs(["cats purr"], [LONG])[0] == pytest.approx(chunk_scores.max(), abs=1e-5)
    # the end of the document is seen only with chunking
    tok = model.tokenizer
    assert "end" in tok.decode(units[-1]["input_ids"]) and "end" not in tok.decode(units[0]["input_ids"])
    capped = CrossEncoderReranker(model.model, tok, model.settings.__class__(max_length=64, max_chunks=2))
    assert len(capped.build_units(["cats purr"], [LONG])[0]) == 2


def test_colbert_maxsim_formula():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(3, 5, 4), dim=-1)
    q_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    d_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    full = maxsim(q, q_mask, d, d_mask, all_pairs=True)
    for b in range(2):
        for n in range(3):
            qi = q[b][q_mask[b] == 1]
            dj = d[n][d_mask[n] == 1]
            expected = (qi @ dj.T).max(dim=1).values.sum() / len(qi)
            assert full[b, n].item() == pytest.approx(expected.item(), abs=1e-6)
    np.testing.assert_allclose(maxsim(q, q_mask, d[:2], d_mask[:2]), full[[0, 1], [0, 1]], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training runs under bf16 autocast
        mixed = maxsim(q, q_mask, d, d_mask, all_pairs=True)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full)


def test_colbert_head_file_loads_safely_and_round_trips(tiny_bert, tmp_path):
    import shutil

    folder = tmp_path / "m3"
    shutil.copytree(tiny_bert, folder)
    head = torch.nn.Linear(32, 16)
    torch.save(head.state_dict(), folder / "colbert_linear.pt")
    model = ColBERTReranker.from_pretrained(str(folder))
    assert model.settings.colbert_dim == 16
    torch.testing.assert_close(model.colbert_linear.weight, head.weight)
    scores = model.score_pairs(QUERIES, DOCS)
    assert np.all(scores <= 1.0 + 1e-5) and np.all(scores >= -1.0 - 1e-5)
    # a pickle that would run code is refused by weights_only=True
    torch.save({"weight": head.weight, "evil": object()}, folder / "colbert_linear.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ColBERTReranker.from_pretrained(str(folder))
    saved = model.save(tmp_path / "colbert")
    again = load_reranker(saved)
    np.testing.assert_allclose(again.score_pairs(QUERIES, DOCS), scores, atol=1e-6)
    # without a head file the head is initialised with the configured width
    fresh = ColBERTReranker.from_pretrained(str(tiny_bert), colbert_dim=8)
    assert fresh.colbert_linear.out_features == 8
    assert {id(p) for p in fresh.head_parameters()} == {id(p) for p in fresh.colbert_linear.parameters()}


def test_colbert_chunks_long_documents(tiny_bert):
    model = ColBERTReranker.from_pretrained(str(tiny_bert), document_max_length=32, max_chunks=64, chunk_overlap=4)
    units, owners = model.build_units(["cats purr", "x"], [LONG, "short doc"])
    assert owners.count(0) > 4 and owners.count(1) == 1
    scores = model.score_units(units).detach().numpy()
    got = model.score_pairs(["cats purr", "x"], [LONG, "short doc"])
    assert got[0] == pytest.approx(scores[np.array(owners) == 0].max(), abs=1e-5)


def test_colbert_encodes_each_text_once_with_the_same_scores(tiny_bert):
    """score_pairs encodes distinct queries/documents once; scores equal the per-pair forward."""
    model = ColBERTReranker.from_pretrained(str(tiny_bert), document_max_length=32, max_chunks=8, chunk_overlap=4)
    queries = ["cats purr", "x", "cats purr", "dogs bark loudly", "x"]
    documents = [LONG, "short doc", "short doc", LONG, LONG]
    units, owners = model.build_units(queries, documents)
    with torch.no_grad():
        per_unit = model.score_units(units).numpy()
    expected = np.full(len(queries), -np.inf)
    np.maximum.at(expected, np.asarray(owners), per_unit)
    calls = []
    hook = model.backbone.register_forward_hook(lambda m, a, kw, o: calls.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    got = model.score_pairs(queries, documents, batch_size=64)
    hook.remove()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    n_chunks = owners.count(0)  # chunks of LONG
    assert sum(calls) == 3 + n_chunks + 1  # 3 distinct queries, LONG's chunks once, "short doc" once


def test_llm_reranker_same_score_left_and_right_padding(tiny_qwen, tmp_path):
    model = LLMReranker.from_pretrained(str(tiny_qwen), max_length=320)
    units, _ = model.build_units(QUERIES, DOCS)
    lengths = {len(u["input_ids"]) for u in units}
    assert len(lengths) == 3  # different lengths: padding really happens
    with torch.no_grad():
        right = model(**model.collate(units, side="right"))
        left = model(**model.collate(units, side="left"))
        alone = torch.cat([model(**model.collate([u], side="left")) for u in units])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # by hand: log P(Yes) against No from the causal LM's logits at the last token of each unpadded input
    with torch.no_grad():
        for unit, score in zip(units, right):
            logits = model.lm(input_ids=torch.tensor([unit["input_ids"]])).logits[0, -1]
            expected = torch.log_softmax(logits[[model.yes_id, model.no_id]].float(), 0)[0]
            assert abs(float(score) - float(expected)) < 1e-5
    # the prompt ends every input
    prompt_ids = model.tokenizer(model.settings.prompt, add_special_tokens=False)["input_ids"]
    assert all(u["input_ids"][-len(prompt_ids):] == prompt_ids for u in units)
    scores = model.score_pairs(QUERIES, DOCS)
    np.testing.assert_allclose(scores, right.numpy(), atol=1e-5)


def test_llm_reranker_lora_save_merges(tiny_qwen, tmp_path):
    model = LLMReranker.from_pretrained(str(tiny_qwen), max_length=320)
    from distributed_ir.config import LoraSettings

    model.attach_lora(LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-zero so the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = model.score_pairs(QUERIES, DOCS)
    again = load_reranker(model.save(tmp_path / "llm"))
    assert not any("lora" in n for n, _ in again.named_parameters())
    np.testing.assert_allclose(again.score_pairs(QUERIES, DOCS), before, atol=1e-4)
    long = LLMReranker.from_pretrained(str(tiny_qwen), max_length=200, max_chunks=20, chunk_overlap=8)
    units, owners = long.build_units(["cats purr"], [LONG])
    assert len(units) > 3 and all(len(u["input_ids"]) <= 200 for u in units)


@pytest.mark.parametrize("kind", ["cross_encoder", "colbert", "llm_reranker"])
def test_compile_backbone_compiles_the_module_that_scores(kind, tiny_bert, tiny_qwen):
    """`rerank --compile` wraps the transformer each reranker scores with, in place."""
    cls = {"cross_encoder": CrossEncoderReranker, "colbert": ColBERTReranker, "llm_reranker": LLMReranker}[kind]
    model = cls.from_pretrained(str(tiny_qwen if kind == "llm_reranker" else tiny_bert))
    backbone = model.scoring_backbone()
    calls = []
    hook = backbone.register_forward_hook(lambda *_: calls.append(1))
    model.score_pairs(QUERIES, DOCS)
    hook.remove()
    assert calls  # scoring runs through this module
    keys = set(model.state_dict())
    model.compile_backbone()
    assert backbone._compiled_call_impl is not None and set(model.state_dict()) == keys


def test_colbert_new_head_leaves_the_global_rng_alone(tiny_bert):
    """Rank 0 builds the export model at every checkpoint: that must not reseed training's RNG."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = ColBERTReranker.from_pretrained(str(tiny_bert), colbert_dim=8)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)  # a different global state gives the same head: its init has its own seed
    second = ColBERTReranker.from_pretrained(str(tiny_bert), colbert_dim=8)
    for name, value in first.colbert_linear.state_dict().items():
        torch.testing.assert_close(second.colbert_linear.state_dict()[name], value, atol=0, rtol=0)
    bound = 1 / 32 ** 0.5  # nn.Linear's default init range for 32 inputs, and not all zeros
    weight = first.colbert_linear.weight
    assert 0 < weight.abs().max() <= bound and weight.std() > bound / 4


def _lora_llm(path, **kw):
    from distributed_ir.config import LoraSettings

    model = LLMReranker.from_pretrained(str(path), max_length=320, **kw)
    model.attach_lora(LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a non-zero adapter, so the merge matters
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_llm_reranker_merged_save_keeps_tied_head_and_dtype(tmp_path):
    """An LM whose head is tied to its embeddings, cast to bf16 after loading (its config still says
    float32): the merged save keeps bf16 and every weight."""
    from safetensors.torch import load_file

    lm = build_tiny_model(tmp_path / "lm", "qwen2_lm", tie_word_embeddings=True)
    model = _lora_llm(lm).to(torch.bfloat16)
    assert model.lm.dtype == torch.bfloat16 and model.lm.config.dtype == torch.float32
    assert model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
    before = model.score_pairs(QUERIES, DOCS)
    saved = model.save(tmp_path / "llm")
    assert {v.dtype for v in load_file(saved / "model.safetensors").values()} == {torch.bfloat16}
    again = load_reranker(saved)
    assert again.lm.dtype == torch.bfloat16 and not any("lora" in n for n, _ in again.named_parameters())
    # merged bf16 weights round once where the live model adds the adapter's output: bf16 tolerance
    np.testing.assert_allclose(again.score_pairs(QUERIES, DOCS), before, atol=2e-2)
    reference = dict(model.merged_state_dict())
    for name, value in again.lm.state_dict().items():
        torch.testing.assert_close(value, reference[name], atol=0, rtol=0, msg=name)


def test_llm_reranker_merged_save_refuses_mismatched_keys(tiny_qwen, tmp_path, monkeypatch):
    model = _lora_llm(tiny_qwen)
    merged = model.merged_state_dict()
    lost = merged.pop("model.norm.weight")
    merged["model.extra.weight"] = lost
    monkeypatch.setattr(model, "merged_state_dict", lambda: merged)
    with pytest.raises(RuntimeError, match=r"(?s)model\.norm\.weight.*model\.extra\.weight"):
        model.save(tmp_path / "llm")
