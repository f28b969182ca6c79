"""Losses against their formulas, computed by hand."""

from __future__ import annotations

import math

import torch

from distributed_ir.losses import CoSENTLoss, InfoNCELoss, TripletMarginLoss


def _unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def test_infonce_matches_formula():
    torch.manual_seed(0)
    q, p, n = _unit(4, 8), _unit(4, 8), _unit(8, 8)
    tau = 0.1
    docs = torch.cat([p, n])
    expected = 0.0
    for i in range(4):
        logits = [float(q[i] @ d) / tau for d in docs]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    got = InfoNCELoss(temperature=tau)(q, p, n)
    assert abs(float(got) - expected / 4) < 1e-5
    # in-batch only
    got_inbatch = InfoNCELoss(temperature=tau)(q, p)
    assert abs(float(got_inbatch) - float(torch.nn.functional.cross_entropy(q @ p.T / tau, torch.arange(4)))) < 1e-6


def _keys(positive_docs: list[str], negative_docs: list[str], positive_sets: list[list[str]]):
    from distributed_ir.train.batching import TextBatch, text_key

    batch = TextBatch(["q"] * len(positive_docs), positive_docs, negative_docs,
                      doc_keys=[text_key(d) for d in positive_docs + negative_docs],
                      positive_keys=[[text_key(d) for d in ps] for ps in positive_sets])
    return batch.key_tensors()


def test_infonce_shared_positive_equals_batch_without_the_duplicate_column():
    """Queries 0 and 2 share positive "a": masking == scoring against the batch holding "a" once."""
    torch.manual_seed(0)
    q, p = _unit(3, 8), _unit(3, 8)
    p[2] = p[0]  # the same document, encoded twice in the batch
    tau = 0.1
    keys = _keys(["a", "b", "a"], [], [["a"], ["b", "x"], ["a", "c"]])
    masked = InfoNCELoss(tau)(q, p, **keys)
    dedup = torch.nn.functional.cross_entropy(q @ p[:2].T / tau, torch.tensor([0, 1, 0]))
    assert abs(float(masked) - float(dedup)) < 1e-6
    unmasked = InfoNCELoss(tau)(q, p)
    assert abs(float(unmasked) - float(dedup)) > 1e-3  # the mask changes the loss here


def test_infonce_hard_negative_that_is_another_querys_positive_is_masked_for_that_query_only():
    torch.manual_seed(1)
    q, p, n = _unit(2, 8), _unit(2, 8), _unit(2, 8)
    tau = 0.1
    # query 1's hard negative "b0" is also a positive of query 0 (not its sampled one)
    keys = _keys(["a0", "a1"], ["n0", "b0"], [["a0", "b0"], ["a1"]])
    got = InfoNCELoss(tau)(q, p, n, **keys)
    docs = torch.cat([p, n])
    row0 = -torch.log_softmax(q[0] @ docs[[0, 1, 2]].T / tau, 0)[0]  # column 3 ("b0") left out
    row1 = -torch.log_softmax(q[1] @ docs.T / tau, 0)[1]
    assert abs(float(got) - float(row0 + row1) / 2) < 1e-6


def test_colbert_in_batch_loss_masks_shared_positives():
    from distributed_ir.losses.false_negatives import shared_positive_mask

    doc_keys = _keys(["a", "b", "a"], [], [["a"], ["b"], ["a"]])
    mask = shared_positive_mask(doc_keys["doc_keys"], doc_keys["positive_keys"], torch.arange(3))
    assert mask.tolist() == [[False, False, True], [False, False, True], [True, False, False]]


def test_triplet_matches_formula():
    torch.manual_seed(1)
    q, p, n = _unit(3, 8), _unit(3, 8), _unit(6, 8)
    m = 0.3
    terms = [max(0.0, m - float(q[i] @ p[i]) + float(q[i] @ n[2 * i + j])) for i in range(3) for j in range(2)]
    assert abs(float(TripletMarginLoss(m)(q, p, n)) - sum(terms) / 6) < 1e-6
    inb = [max(0.0, m - float(q[i] @ p[i]) + float(q[i] @ p[j])) for i in range(3) for j in range(3) if i != j]
    assert abs(float(TripletMarginLoss(m)(q, p)) - sum(inb) / 6) < 1e-6


def test_cosent_matches_formula():
    torch.manual_seed(2)
    q, d = torch.randn(5, 8), torch.randn(5, 8)
    y = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2])
    s = torch.nn.functional.cosine_similarity(q, d) * 20
    terms = [math.exp(float(s[j] - s[i])) for i in range(5) for j in range(5) if y[i] > y[j]]
    assert abs(float(CoSENTLoss(20)(q, d, y)) - math.log(1 + sum(terms))) < 1e-4


def test_pointwise_bce_matches_formula():
    from distributed_ir.losses import PointwiseBCELoss

    s = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    sig = torch.sigmoid(s)
    expected = -(y * sig.log() + (1 - y) * (1 - sig).log()).mean()
    assert abs(float(PointwiseBCELoss()(s)) - float(expected)) < 1e-6  # grouped: column 0 positive
    assert abs(float(PointwiseBCELoss()(s.flatten(), y.flatten())) - float(expected)) < 1e-6
    weighted = -(2 * y * sig.log() + (1 - y) * (1 - sig).log()).mean()
    assert abs(float(PointwiseBCELoss(pos_weight=2.0)(s)) - float(weighted)) < 1e-6


def test_listwise_softmax_matches_formula():
    from distributed_ir.losses import ListwiseSoftmaxLoss

    s = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
    tau = 0.5
    expected = sum(-(s[b, 0] / tau - torch.logsumexp(s[b] / tau, 0)) for b in range(2)) / 2
    assert abs(float(ListwiseSoftmaxLoss(tau)(s)) - float(expected)) < 1e-6
    targets = torch.tensor([2, 1])
    expected_t = sum(-(s[b, t] / tau - torch.logsumexp(s[b] / tau, 0)) for b, t in zip(range(2), targets)) / 2
    assert abs(float(ListwiseSoftmaxLoss(tau)(s, targets)) - float(expected_t)) < 1e-6


def test_kl_distillation_matches_formula():
    from distributed_ir.losses import KLDistillationLoss

    torch.manual_seed(3)
    q, p, n = _unit(2, 8), _unit(2, 8), _unit(4, 8)  # 2 negatives per query
    teacher = torch.tensor([[4.0, 1.0, 2.5], [0.5, 3.0, -1.0]])
    ts, tt = 0.1, 2.0
    expected = 0.0
    for i in range(2):
        s = torch.stack([q[i] @ p[i], q[i] @ n[2 * i], q[i] @ n[2 * i + 1]]) / ts
        pt = torch.softmax(teacher[i] / tt, 0)
        expected += float((pt * (pt.log() - torch.log_softmax(s, 0))).sum())
    got = KLDistillationLoss(student_temperature=ts, teacher_temperature=tt)(q, p, n, teacher)
    assert abs(float(got) - expected / 2) < 1e-6
    # zero when the student's softmax is the teacher's
    student_logits = torch.stack([torch.stack([q[i] @ p[i], q[i] @ n[2 * i], q[i] @ n[2 * i + 1]]) for i in range(2)])
    same = KLDistillationLoss(ts, 1.0)(q, p, n, student_logits / ts)
    assert abs(float(same)) < 1e-6
