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


def test_infonce_prefers_correct_pairs():
    q = _unit(3, 16)
    assert InfoNCELoss(0.05)(q, q) < InfoNCELoss(0.05)(q, q.roll(1, 0))


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
