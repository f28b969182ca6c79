"""Precision chosen by measurement: the decision rule, the measuring loop, the per-host cache, and
int8 (ONNX Runtime) and bf16w (bfloat16 weights) vectors and scores against fp32, with the int8
export cached once per model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_ir.models.precision import (
    PRECISIONS,
    PrecisionChoice,
    PrecisionPolicy,
    bf16_copy,
    bf16w_missing,
    cached_decision,
    candidates,
    check_forced,
    choose_precision,
    compile_in_place,
    decide,
    decision_key,
    int8_missing,
    measure,
    min_row_cosine,
    model_cache_dir,
    score_cosine,
)

CPU = torch.device("cpu")
TEXTS = ["Aspirin lowers the risk of heart attack in adults over fifty.",
         "Vitamin D", "A randomised trial of statins in elderly patients with " + "chronic kidney disease " * 6,
         "Protein folding is driven by hydrophobic collapse.", "x",
         "Gene expression in the mouse retina changes after light exposure."]


# ---------------------------------------------------------------- the decision rule (injected timings)
def test_auto_picks_the_fastest_variant_that_passes_the_gate():
    seconds = {"fp32": 1.0, "bf16": 0.70, "int8": 0.50}
    assert choose_precision(seconds, {"bf16": 0.9999, "int8": 0.995})[0] == "int8"
    # int8 as torch's dynamic quantisation measured it (min cosine 0.88): never chosen, and said why
    chosen, rejected = choose_precision(seconds, {"bf16": 0.9999, "int8": 0.88})
    assert chosen == "bf16" and "quality gate" in rejected["int8"] and "0.8800" in rejected["int8"]
    # the gate is configurable
    assert choose_precision(seconds, {"bf16": 0.9999, "int8": 0.88}, min_cosine=0.85)[0] == "int8"


def test_auto_is_never_slower_than_fp32():
    # the no-AMX Xeon: bf16 autocast 0.70x fp32, int8 unavailable -> fp32
    chosen, rejected = choose_precision({"fp32": 1.0, "bf16": 1 / 0.70}, {"bf16": 0.99997},
                                        unavailable={"int8": "unavailable: no onnxruntime"})
    assert chosen == "fp32" and "not faster" in rejected["bf16"] and rejected["int8"].startswith("unavailable")
    # within timing noise of fp32 (less than min_speedup) is not worth the rounding
    assert choose_precision({"fp32": 1.0, "bf16": 0.97}, {"bf16": 1.0})[0] == "fp32"
    assert choose_precision({"fp32": 1.0, "bf16": 0.97}, {"bf16": 1.0}, min_speedup=1.0)[0] == "bf16"
    with pytest.raises(ValueError, match="fp32 must be measured"):
        choose_precision({"bf16": 0.5}, {"bf16": 1.0})


def test_bf16_weights_are_chosen_when_fastest_and_never_when_they_fail_the_gate():
    # the AMX Xeon (BENCHMARKS.md): fp32 32 docs/s, autocast 83, bf16 weights 92, ONNX int8 30
    seconds = {"fp32": 1 / 32, "bf16": 1 / 83, "bf16w": 1 / 92, "int8": 1 / 30}
    quality = {"bf16": 0.99997, "bf16w": 0.99992, "int8": 0.991}
    chosen, rejected = choose_precision(seconds, quality)
    assert chosen == "bf16w" and "slower than bf16w" in rejected["bf16"] and "not faster" in rejected["int8"]
    # a model whose bf16 weights lose too much (cosine 0.95): the fastest is refused, autocast wins
    chosen, rejected = choose_precision(seconds, {**quality, "bf16w": 0.95})
    assert chosen == "bf16" and "quality gate" in rejected["bf16w"] and "0.9500" in rejected["bf16w"]
    # NaN outputs (bf16 overflow) fail the gate too, however fast
    assert choose_precision({"fp32": 1.0, "bf16w": 0.1}, {"bf16w": float("nan")})[0] == "fp32"
    # autocast faster than bf16 weights (a CPU where the casts are cheap): autocast
    assert choose_precision({**seconds, "bf16": 1 / 95}, quality)[0] == "bf16"


def test_bf16w_is_a_candidate_where_bfloat16_runs(monkeypatch):
    names, skipped = candidates(CPU, None)
    assert names == ["fp32", "bf16", "bf16w", "int8", "openvino"] and set(skipped) == {"fp16"}
    names, skipped = candidates(CPU, "no int8", "the model has no float32 weights to cast to bfloat16")
    assert names == ["fp32", "bf16"] and "float32 weights" in skipped["bf16w"]
    assert skipped["int8"] == skipped["openvino"] == "no int8"  # both run the exported body
    assert bf16w_missing(torch.nn.Linear(2, 2)) is None
    assert "no float32 weights" in bf16w_missing(torch.nn.Linear(2, 2).to(torch.bfloat16))
    cuda = torch.device("cuda")  # no GPU needed: only the bfloat16 support is asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    names, skipped = candidates(cuda, None)
    assert names == ["fp32", "fp16", "bf16", "bf16w"] and "CPU" in skipped["openvino"]
    check_forced("bf16w", cuda, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    names, skipped = candidates(cuda, None)
    assert names == ["fp32", "fp16"] and "no bfloat16" in skipped["bf16w"] and "no bfloat16" in skipped["bf16"]
    with pytest.raises(ValueError, match="bf16w: this GPU has no bfloat16"):
        check_forced("bf16w", cuda, None)
    check_forced("bf16w", CPU, None)


def test_decision_rule_on_random_timings_and_cosines():
    """Property check over many injected cases: the winner passes the gate, is never slower than
    fp32, and no other passing variant is faster."""
    rng = random.Random(0)
    picked = set()
    for _ in range(2000):
        names = ["fp32"] + rng.sample(["bf16", "bf16w", "fp16", "int8", "openvino"], rng.randint(0, 5))
        seconds = {n: rng.uniform(0.2, 2.0) for n in names}
        quality = {n: rng.choice([1.0, rng.uniform(0.85, 1.0)]) for n in names if n != "fp32"}
        chosen, rejected = choose_precision(seconds, quality, 0.99, 1.05)
        picked.add(chosen)
        assert seconds[chosen] <= seconds["fp32"]
        if chosen != "fp32":
            assert quality[chosen] >= 0.99 and seconds[chosen] * 1.05 <= seconds["fp32"]
        ok = [n for n in quality if quality[n] >= 0.99 and seconds[n] * 1.05 <= seconds["fp32"]]
        assert seconds[chosen] == min([seconds[n] for n in ok] or [seconds["fp32"]])
        assert set(rejected) == set(quality) - {chosen}
    assert picked == {"fp32", "bf16", "bf16w", "fp16", "int8", "openvino"}


# ---------------------------------------------------------------- the measuring loop (injected clock)
def test_measure_times_medians_alternates_and_gives_up_on_slow_variants():
    now = [0.0]
    calls: list[str] = []
    # per call: an untimed warm-up (slow: it builds the variant), then the timed rounds
    costs = {"fp32": [3.0, 1.0, 1.2, 0.8], "bf16": [9.0, 0.6, 0.4, 0.9], "slow": [1.0, 5.0, 5.0, 5.0]}

    def run(name):
        def go():
            now[0] += costs[name][sum(c == name for c in calls)]
            calls.append(name)
            return np.ones((2, 3))
        return go

    def broken():
        raise RuntimeError("no kernel")

    runs = {**{n: run(n) for n in costs}, "int8": broken}
    seconds, outputs, unavailable = measure(runs, rounds=3, clock=lambda: now[0])
    assert seconds == pytest.approx({"fp32": 1.0, "bf16": 0.6, "slow": 5.0})  # medians, warm-up not counted
    assert set(outputs) == {"fp32", "bf16", "slow"} and "no kernel" in unavailable["int8"]
    # warm-up, then round 1 in order, round 2 reversed, round 3 in order; "slow" (5x fp32) timed once
    assert calls == ["fp32", "bf16", "slow", "fp32", "bf16", "slow", "bf16", "fp32", "fp32", "bf16"]


def test_quality_measures():
    ref = np.random.default_rng(0).standard_normal((5, 8))
    assert min_row_cosine(ref, 3 * ref) == pytest.approx(1.0)
    worse = ref.copy()
    worse[2] = -worse[2]
    assert min_row_cosine(ref, worse) == pytest.approx(-1.0)
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    assert score_cosine(scores, scores * 2 + 5) == pytest.approx(1.0)  # same ranking, other scale
    assert score_cosine(scores, scores[::-1]) == pytest.approx(-1.0)


def test_forced_precisions_the_device_cannot_run_are_refused():
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        check_forced("fp16", CPU, None)
    with pytest.raises(ValueError, match="int8 runs on CPU"):
        check_forced("int8", torch.device("cuda"), None)
    with pytest.raises(ValueError, match="int8: not offered for this model kind"):
        check_forced("int8", CPU, int8_missing(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="openvino runs on CPU"):
        check_forced("openvino", torch.device("cuda"), None)
    with pytest.raises(ValueError, match="openvino: not offered for this model kind"):
        check_forced("openvino", CPU, int8_missing(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="precision 'int4'"):
        PrecisionPolicy("int4")
    with pytest.raises(ValueError, match="slower than fp32"):
        PrecisionPolicy(min_speedup=0.9)


def test_cli_and_config_accept_exactly_the_precisions():
    from distributed_ir.cli import build_parser
    from distributed_ir.config import PRECISION_CHOICES

    assert PRECISION_CHOICES == PRECISIONS
    index = next(a for a in build_parser()._subparsers._group_actions[0].choices["index"]._actions
                 if a.dest == "precision")
    assert tuple(index.choices) == PRECISIONS


# ---------------------------------------------------------------- the decision cache
def test_decision_is_measured_once_per_host_and_model_then_cached(tiny_bert, tmp_path):
    policy = PrecisionPolicy(cache_dir=str(tmp_path), rounds=2)
    calls = {"fp32": 0, "bf16": 0}

    def runs():
        def go(name, out):
            def f():
                calls[name] += 1
                time.sleep(0.02 if name == "fp32" else 0.005)
                return out
            return f
        ref = np.eye(3)
        return {"fp32": go("fp32", ref), "bf16": go("bf16", ref + 1e-4)}

    first = decide(tiny_bert, {"role": "embedder-document", "batch_size": 8}, CPU, policy, runs(), min_row_cosine, {})
    assert first.chosen == "bf16" and not first.cached and calls == {"fp32": 3, "bf16": 3}
    again = decide(tiny_bert, {"role": "embedder-document", "batch_size": 8}, CPU, policy, runs(), min_row_cosine, {})
    assert again.cached and again.chosen == "bf16" and again.seconds == first.seconds and calls["fp32"] == 3
    # another role (query encoding: other lengths) is measured on its own
    other = decide(tiny_bert, {"role": "embedder-query", "batch_size": 8}, CPU, policy, runs(), min_row_cosine, {})
    assert not other.cached and calls["fp32"] == 6
    saved = json.loads(next(tmp_path.glob("*/decisions.json")).read_text())
    assert len(saved) == 2 and {d["key"]["role"] for d in saved.values()} == {"embedder-document", "embedder-query"}


def test_an_unwritable_cache_still_decides(tiny_bert, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    runs = {"fp32": lambda: np.eye(2), "bf16": lambda: -np.eye(2)}  # bf16 flips the vectors: gate fails
    decision = decide(tiny_bert, {"role": "embedder-document"}, CPU, PrecisionPolicy(cache_dir=str(blocker), rounds=1),
                      runs, min_row_cosine, {})
    assert decision.chosen == "fp32" and not decision.cached and "quality gate" in decision.rejected["bf16"]


def test_a_cache_written_before_bf16w_is_measured_again_and_old_entries_still_read(tiny_bert, tmp_path):
    """decisions.json as the code before bf16w wrote it: the key hashed the candidates it measured
    (fp32, bf16, int8 on a CPU), so the new candidate set misses it and measures once; an entry
    under the current key in that same format is read as it was written."""
    policy = PrecisionPolicy(cache_dir=str(tmp_path), rounds=1)
    role = {"role": "embedder-document", "batch_size": 8}
    _, old_id = decision_key(CPU, role, policy, ["fp32", "bf16", "int8"])
    old_entry = {"chosen": "bf16", "requested": "auto", "seconds": {"fp32": 0.4, "bf16": 0.15, "int8": 0.43},
                 "quality": {"fp32": 1.0, "bf16": 0.99997, "int8": 0.991},
                 "rejected": {"int8": "not faster than fp32 by 1.05x (0.93x)", "fp16": "fp16 autocast needs a GPU"},
                 "min_cosine": 0.99, "min_speedup": 1.05, "calibration_texts": 32, "key": {"role": "embedder-document"}}
    folder = model_cache_dir(tiny_bert, policy)
    folder.mkdir(parents=True)
    (folder / "decisions.json").write_text(json.dumps({old_id: old_entry}))
    calls = []

    def run(name, out):
        def f():
            calls.append(name)
            time.sleep({"fp32": 0.02, "bf16": 0.008, "bf16w": 0.004}[name])
            return out
        return f

    runs = {"fp32": run("fp32", np.eye(3)), "bf16": run("bf16", np.eye(3)), "bf16w": run("bf16w", np.eye(3))}
    new = decide(tiny_bert, role, CPU, policy, runs, min_row_cosine, {})
    assert not new.cached and new.chosen == "bf16w" and "bf16w" in calls
    saved = json.loads((folder / "decisions.json").read_text())
    assert saved[old_id] == old_entry and len(saved) == 2  # the old decision is kept, beside the new one
    # the same old-format entry under the key of what is measured now: reused as written
    calls.clear()
    _, old_runs_id = decision_key(CPU, role, policy, ["fp32", "bf16"])
    (folder / "decisions.json").write_text(json.dumps({old_runs_id: {**old_entry, "chosen": "bf16"}}))
    again = decide(tiny_bert, role, CPU, policy, {"fp32": runs["fp32"], "bf16": runs["bf16"]}, min_row_cosine, {})
    assert again.cached and again.chosen == "bf16" and again.seconds == old_entry["seconds"] and calls == []


def test_cached_entries_this_version_cannot_use_are_measured_again():
    entry = {"chosen": "bf16w", "requested": "auto", "seconds": {"fp32": 1.0, "bf16w": 0.3}}
    assert cached_decision(entry, ["fp32", "bf16", "bf16w"]).chosen == "bf16w"
    assert cached_decision(entry, ["fp32", "bf16"]) is None  # chose a variant not measured here
    assert cached_decision({**entry, "chosen": "int4"}, ["fp32", "bf16w"]) is None
    assert cached_decision({**entry, "from_the_future": 1}, ["fp32", "bf16w"]) is None
    assert cached_decision({"seconds": {}}, ["fp32"]) is None and cached_decision("junk", ["fp32"]) is None


# ---------------------------------------------------------------- bf16w: a copy with bfloat16 weights
def test_mean_pooling_sums_bfloat16_states_in_float32():
    from distributed_ir.models.pooling import pool

    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 8) + 4  # 300 tokens: bf16 counts only even numbers above 256
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 291:] = 0
    ref = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.equal(pool(hidden, mask, "mean"), (hidden * mask[..., None].float()).sum(1)
                       / mask[..., None].float().sum(1).clamp(min=1e-9))  # fp32: the same numbers as before
    got = pool(hidden.bfloat16(), mask, "mean")
    assert got.dtype == torch.float32
    exact = (hidden.bfloat16().float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(got, exact)  # only the inputs' rounding, none added by the sum
    assert (got - ref).abs().max() < 2e-3
    assert pool(hidden.bfloat16(), mask, "cls").dtype == torch.bfloat16  # a row, selected exactly


def test_bf16w_leaves_the_callers_model_alone_and_frees_its_weights_once_chosen(tiny_bert, tmp_path):
    from distributed_ir.models.embedder import Embedder

    emb = Embedder.load(tiny_bert).eval()
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    choice = PrecisionChoice(emb, tiny_bert, CPU, PrecisionPolicy(cache_dir=str(tmp_path)), {"role": "embedder-document"})
    copy_, dtype = choice.variant("bf16w")
    assert dtype is None and copy_ is not emb and copy_.tokenizer is not None
    assert {p.dtype for p in copy_.parameters()} == {torch.bfloat16}
    assert choice.variant("bf16w")[0] is copy_  # built once, during the warm-up
    assert choice.variant("fp32") == (emb, None) and choice.variant("bf16") == (emb, torch.bfloat16)
    choice.apply("bf16w")
    assert choice.model is copy_ and choice.base is None
    with pytest.raises(RuntimeError, match="released"):
        choice.variant("fp32")
    # the caller's model: the same fp32 numbers
    assert all(torch.equal(v, before[k]) for k, v in emb.state_dict().items())
    # measured, not chosen: the copy is freed
    other = PrecisionChoice(emb, tiny_bert, CPU, PrecisionPolicy(cache_dir=str(tmp_path)), {"role": "x"})
    other.variant("bf16w")
    other.apply("bf16")
    assert "bf16w" not in other._copies and other.model is emb and other.dtype == torch.bfloat16


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor the ops under it create."""

    def __init__(self):
        super().__init__()
        self.bytes, self.fp32 = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):  # views (detach) share their input's storage: not new
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.bytes += t.untyped_storage().nbytes()
                self.fp32 += t.untyped_storage().nbytes() if t.dtype == torch.float32 else 0
        return out


def test_bf16_copy_never_makes_a_float32_copy_and_keeps_ties():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(500, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 500))
    model[2].weight = model[0].weight  # tied, as embedders' heads often are
    model.register_buffer("scale", torch.ones(64))
    model.register_buffer("positions", torch.arange(64))  # not floating: kept as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_bytes = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    with _Allocations() as made:
        out = bf16_copy(model)
    # only the bfloat16 tensors: half the fp32 weights (a deepcopy then .to() made 1.5x, fp32 first)
    assert made.fp32 == 0 and made.bytes <= fp32_bytes // 2 + 64 * 8
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16} and out.scale.dtype == torch.bfloat16
    assert out.positions.dtype == torch.int64 and out[2].weight is out[0].weight
    assert all(isinstance(p, torch.nn.Parameter) for p in out.parameters())
    # the caller's model: untouched float32, no tensor shared with the copy
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not {t.data_ptr() for t in model.state_dict().values()} & {t.data_ptr() for t in out.state_dict().values()}
    torch.testing.assert_close(out[0].weight.float(), model[0].weight, atol=1e-2, rtol=1e-2)


def test_bf16_copy_of_a_compiled_module_is_compiled_the_same_way():
    graphs = []

    def backend(gm, example_inputs):  # a counting backend: no inductor build in a unit test
        graphs.append([t.dtype for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    class Block(torch.nn.Module):  # dynamo does not trace torch.nn's own modules as a frame
        def __init__(self, n):
            super().__init__()
            self.linear = torch.nn.Linear(8, n)

        def forward(self, x):
            return self.linear(x).relu()

    model = torch.nn.Sequential(Block(8), Block(8), Block(2))
    compile_in_place(model[0], backend=backend)
    model[2].compile()  # compiled without compile_in_place: torch.compile's defaults
    out = bf16_copy(model)
    assert out[0]._compiled_call_impl is not None and out[2]._compiled_call_impl is not None
    assert out[1]._compiled_call_impl is None  # what was not compiled stays so
    y = out[0](torch.randn(3, 8, dtype=torch.bfloat16))
    assert len(graphs) == 1 and y.dtype == torch.bfloat16  # the copy's own bfloat16 weights, compiled
    assert torch.bfloat16 in graphs[0] and torch.float32 not in graphs[0]


def test_bf16w_copy_of_a_compiled_reranker_is_compiled(tmp_path):
    from distributed_ir.eval.rerank import RerankStage
    from distributed_ir.models.cross_encoder import CrossEncoderReranker
    from tests.conftest import build_tiny_model

    model = CrossEncoderReranker.from_pretrained(str(build_tiny_model(tmp_path / "body", "bert"))).save(tmp_path / "ce")
    stage = RerankStage(str(model), batch_size=4, device="cpu", precision="bf16w", compile=True)
    backbone = stage.reranker.scoring_backbone()
    assert {p.dtype for p in stage.reranker.parameters()} == {torch.bfloat16}
    assert backbone._compiled_call_impl is not None  # --precision bf16w --compile runs compiled


def test_bf16w_is_refused_for_a_model_without_float32_weights(tmp_path):
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bf16w: the model has no float32 weights to cast to bfloat16; use fp32"):
        PrecisionChoice(model, tmp_path, CPU, PrecisionPolicy("bf16w", cache_dir=str(tmp_path)), {"role": "x"})
    with pytest.raises(ValueError, match="bf16w: the model has no float32 weights"):
        check_forced("bf16w", CPU, None, bf16w_missing(model))
    assert PrecisionChoice(model, tmp_path, CPU, PrecisionPolicy("fp32", cache_dir=str(tmp_path)), {}).model is model


def test_bf16w_vectors_are_float32_and_pass_the_gate_on_a_tiny_model(tiny_bert, tmp_path):
    ref = _stage(tiny_bert, "fp32", tmp_path).encode(TEXTS)
    stage = _stage(tiny_bert, "bf16w", tmp_path)
    got = stage.encode(TEXTS)
    assert {p.dtype for p in stage.embedder.parameters()} == {torch.bfloat16} and stage.dtype is None
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert 1e-6 < np.abs(got - ref).max()  # bfloat16 ran (not the same numbers) ...
    assert min_row_cosine(ref, got) >= 0.99  # ... and passes the gate
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in float32
    out = stage({"doc_id": np.arange(2), "text": np.array(TEXTS[:2], dtype=object)})
    assert out["embedding"].dtype == np.float32
    assert json.loads(out["precision_decision"][0])["chosen"] == "bf16w"


# ---------------------------------------------------------------- int8 through ONNX Runtime
def _stage(model, precision, cache):
    from distributed_ir.index.encode import EncodeStage

    return EncodeStage(str(model), batch_size=4, device="cpu",
                       precision=PrecisionPolicy(precision, cache_dir=str(cache)), report_precision=True)


def test_int8_vectors_pass_the_gate_on_a_tiny_model(tiny_bert, tmp_path):
    from distributed_ir.models.onnx_int8 import OnnxBody

    ref = _stage(tiny_bert, "fp32", tmp_path).encode(TEXTS)
    stage = _stage(tiny_bert, "int8", tmp_path)
    got = stage.encode(TEXTS)
    assert isinstance(stage.embedder.backbone, OnnxBody)  # the body ran in ONNX Runtime ...
    assert 1e-6 < np.abs(got - ref).max()  # ... quantised (not the same numbers) ...
    assert min_row_cosine(ref, got) >= 0.99  # ... and passes the gate
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's normalisation


def test_openvino_vectors_pass_the_gate_and_reuse_the_cached_export(tiny_bert, tmp_path):
    from distributed_ir.models.onnx_int8 import META_FILE, build_int8
    from distributed_ir.models.openvino_body import OpenVinoBody

    ref = _stage(tiny_bert, "fp32", tmp_path).encode(TEXTS)
    stage = _stage(tiny_bert, "openvino", tmp_path)
    got = stage.encode(TEXTS)
    assert isinstance(stage.embedder.backbone, OpenVinoBody)  # the body ran in OpenVINO ...
    assert stage.choice.base is None  # ... and the fp32 torch weights were let go
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert min_row_cosine(ref, got) >= 0.99  # ... and passes the gate
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's normalisation
    out = stage({"doc_id": np.arange(2), "text": np.array(TEXTS[:2], dtype=object)})
    assert json.loads(out["precision_decision"][0])["chosen"] == "openvino"
    # the fp32 export is cached beside the int8 one and reused: a second stage builds nothing
    from distributed_ir.models.embedder import Embedder

    emb = Embedder.load(tiny_bert).eval()
    path, built = build_int8(emb.backbone, emb.onnx_example(), "last_hidden_state", tiny_bert, "embedder", tmp_path,
                             quantize=False)
    assert not built and path.parent.name.startswith("fp32-embedder-")
    assert json.loads((path.parent / META_FILE).read_text())["quantization"] is None
    mtime = path.stat().st_mtime_ns
    _stage(tiny_bert, "openvino", tmp_path).encode(TEXTS[:2])
    assert path.stat().st_mtime_ns == mtime


def test_auto_in_a_stage_records_its_decision(tiny_bert, tmp_path):
    stage = _stage(tiny_bert, "auto", tmp_path)
    out = stage({"doc_id": np.arange(len(TEXTS)), "text": np.array(TEXTS, dtype=object)})
    decision = json.loads(out["precision_decision"][0])
    assert list(out["precision_decision"][1:]) == [""] * (len(TEXTS) - 1)
    assert decision["requested"] == "auto" and decision["chosen"] == stage.decision.chosen
    assert set(decision["seconds"]) == {"fp32", "bf16", "bf16w", "int8", "openvino"}
    assert decision["quality"]["fp32"] == 1.0
    assert decision["calibration_texts"] == len(TEXTS)
    ref = _stage(tiny_bert, "fp32", tmp_path).encode(TEXTS)
    assert min_row_cosine(ref, out["embedding"]) >= 0.99
    # the second call of the stage reports nothing more
    more = stage({"doc_id": np.arange(2), "text": np.array(TEXTS[:2], dtype=object)})
    assert list(more["precision_decision"]) == ["", ""]


def test_int8_export_is_cached_and_reused(tiny_bert, tmp_path):
    from distributed_ir.models.embedder import Embedder
    from distributed_ir.models.onnx_int8 import META_FILE, build_int8

    emb = Embedder.load(tiny_bert).eval()
    path, built = build_int8(emb.backbone, emb.onnx_example(), "last_hidden_state", tiny_bert, "embedder", tmp_path)
    assert built and path.is_file()
    meta = json.loads((path.parent / META_FILE).read_text())
    assert meta["built_by_pid"] == os.getpid() and meta["quantization"]["per_channel"]
    mtime = path.stat().st_mtime_ns
    again, built_again = build_int8(emb.backbone, emb.onnx_example(), "last_hidden_state", tiny_bert, "embedder",
                                    tmp_path)
    assert again == path and not built_again
    _stage(tiny_bert, "int8", tmp_path).encode(TEXTS[:2])  # a stage loads the same export
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.parent.iterdir() if ".tmp-" in p.name] == []  # nothing half-built left


_BUILD = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from distributed_ir.models.onnx_int8 import build_int8

class Body(torch.nn.Module):  # a transformer-shaped body, small: the test is about the lock
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.dense = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.dense(self.embed(input_ids)) * attention_mask[..., None])

model_dir, cache, me, other = sys.argv[1:]
example = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
Path(me).touch()
while not Path(other).exists():  # both processes reach the export together
    time.sleep(0.01)
path, built = build_int8(Body().eval(), example, "last_hidden_state", model_dir, "body", Path(cache))
print(json.dumps({"path": str(path), "built": built, "pid": os.getpid()}))
"""


@pytest.mark.slow
def test_two_processes_exporting_at_once_build_one_valid_export(tmp_path):
    import onnxruntime as ort

    from tests.conftest import REPO

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / "model"), str(tmp_path / "cache"),
                               str(ready[i]), str(ready[1 - i])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [False, True]  # one built, the other waited and reused it
    assert results[0]["path"] == results[1]["path"]
    folder = os.path.dirname(results[0]["path"])
    builder = next(r["pid"] for r in results if r["built"])
    assert json.loads(open(os.path.join(folder, "export.json")).read())["built_by_pid"] == builder
    assert [p for p in os.listdir(os.path.dirname(folder)) if ".tmp-" in p] == []
    session = ort.InferenceSession(results[0]["path"], providers=["CPUExecutionProvider"])
    out = session.run(None, {"input_ids": np.array([[7, 8]]), "attention_mask": np.array([[1, 1]])})[0]
    assert out.shape == (1, 2, 16)


@pytest.mark.slow
def test_int8_bf16w_and_openvino_pass_the_gate_on_real_minilm(tmp_path, scifact_dir):
    """SciFact documents, as an index's calibration batch sees them (measured here: min cosine 0.991)."""
    from tests.conftest import minilm_path

    docs = []
    with open(scifact_dir / "corpus.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            docs.append((r["title"] + " " + r["text"]).strip())
            if len(docs) == 32:
                break
    ref = _stage(minilm_path(), "fp32", tmp_path).encode(docs)
    got = _stage(minilm_path(), "int8", tmp_path).encode(docs)
    assert 0.99 <= min_row_cosine(ref, got) < 0.9999
    # bfloat16 weights keep far more (measured in BENCHMARKS.md on 300 documents: 0.99992)
    got = _stage(minilm_path(), "bf16w", tmp_path).encode(docs)
    assert got.dtype == np.float32 and 0.999 <= min_row_cosine(ref, got) < 1.0
    # OpenVINO: bfloat16 on an AMX CPU, float32 elsewhere; either way far above the gate
    got = _stage(minilm_path(), "openvino", tmp_path).encode(docs)
    assert got.dtype == np.float32 and min_row_cosine(ref, got) >= 0.999


# ---------------------------------------------------------------- rerankers
def _tiny_reranker_and_fp32_scores(kind: str, tmp_path):
    """A saved tiny cross-encoder / ColBERT, 12 (query, document) pairs and its fp32 scores."""
    from distributed_ir.eval.rerank import RerankStage
    from distributed_ir.models.colbert import ColBERTReranker
    from distributed_ir.models.cross_encoder import CrossEncoderReranker
    from tests.conftest import build_tiny_model

    # init 0.2: scores that vary with the pair (at 0.02 a random tiny model scores all pairs within 1e-4)
    body = build_tiny_model(tmp_path / "body", "bert", initializer_range=0.2)
    torch.manual_seed(0)
    cls = CrossEncoderReranker if kind == "cross_encoder" else ColBERTReranker
    model = cls.from_pretrained(str(body)).save(tmp_path / kind)
    queries = [TEXTS[i % 3] for i in range(12)]
    docs = [TEXTS[(i * 5) % len(TEXTS)] + " " + TEXTS[i % len(TEXTS)] for i in range(12)]
    ref = RerankStage(str(model), batch_size=4, precision="fp32", device="cpu").score(queries, docs)
    return model, queries, docs, ref


@pytest.mark.parametrize("precision", ["int8", "openvino"])
@pytest.mark.parametrize("kind", ["cross_encoder", "colbert"])
def test_exported_reranker_scores_pass_the_gate(kind, precision, tmp_path):
    """int8 (ONNX Runtime) and openvino (OpenVINO) run the reranker's exported body."""
    from distributed_ir.eval.rerank import RerankStage
    from distributed_ir.models.onnx_int8 import OnnxBody
    from distributed_ir.models.openvino_body import OpenVinoBody

    model, queries, docs, ref = _tiny_reranker_and_fp32_scores(kind, tmp_path)
    stage = RerankStage(str(model), batch_size=4, device="cpu",
                        precision=PrecisionPolicy(precision, cache_dir=str(tmp_path / "cache")))
    got = stage.score(queries, docs)
    body = stage.reranker.model if kind == "cross_encoder" else stage.reranker.backbone
    assert isinstance(body, OnnxBody if precision == "int8" else OpenVinoBody)
    assert got.dtype == np.float32 and ref.std() > 0.05  # the pairs are told apart ...
    assert score_cosine(ref, got) >= 0.99  # ... and the exported body keeps the order
    if precision == "int8":
        assert 1e-6 < np.abs(got - ref).max()  # quantised: not the same numbers


@pytest.mark.parametrize("kind", ["cross_encoder", "colbert"])
def test_bf16w_reranker_scores_are_float32_and_pass_the_gate(kind, tmp_path):
    from distributed_ir.eval.rerank import RerankStage

    model, queries, docs, ref = _tiny_reranker_and_fp32_scores(kind, tmp_path)
    stage = RerankStage(str(model), batch_size=4, device="cpu", precision="bf16w")
    got = stage.score(queries, docs)
    assert {p.dtype for p in stage.reranker.parameters()} == {torch.bfloat16}  # ColBERT's head too
    assert got.dtype == np.float32 and ref.std() > 0.05
    assert 1e-6 < np.abs(got - ref).max() and score_cosine(ref, got) >= 0.99


def test_llm_reranker_measures_without_int8(tmp_path):
    """An LLM reranker has no int8 body: auto leaves it out and says why."""
    choice = PrecisionChoice(torch.nn.Linear(2, 2), tmp_path, CPU, PrecisionPolicy(cache_dir=str(tmp_path)),
                             {"role": "reranker-llm_reranker"})
    decision = choice.calibrate(lambda model, dtype: np.ones(4), score_cosine)
    assert "int8" not in decision.seconds and "embedders, cross-encoders and ColBERT only" in decision.rejected["int8"]
    assert "openvino" not in decision.seconds and "ColBERT only" in decision.rejected["openvino"]
