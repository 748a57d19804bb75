"""The enumerated generator gradient (``analysis/enumerated.py``): exact where it must be, and
DPG's expected update converging to it as the inner lr vanishes.

Four candidate rows, sets of n = 3 draws (20 multisets), a float32 tiny target computed in
float64, the L2-norm metric. Measured with logits (0.5, -0.3, 0.2, 0) and full-batch SGD:
DPG's cosine to grad J is 0.96 / 0.88 at lr 1 (1 / 3 steps) and 1.0000 / 0.9996 at lr 0.003.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dpg_lightning.analysis.enumerated import (
    compare_gradients,
    draws,
    evaluate_sets,
    multisets,
    set_order,
    set_probabilities,
)
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import InnerConfig, InnerOptimConfig
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import tiny

LOGITS = torch.tensor([0.5, -0.3, 0.2, 0.0])
CANDIDATES = ["hello world", "abc", "zz top", "the cat sat"]


def _values(tokenizer, lr: float, steps: int):
    target = tiny("gpt2", dtype="float32", init_std=0.2)
    cands = tokenize_examples(CANDIDATES, tokenizer, 32)
    cfg = InnerConfig(optim=InnerOptimConfig("sgd", lr=lr), backend="func")
    return evaluate_sets(target, cands, LMHeadL2Norm(), cfg, n=3, steps=steps)


def test_multisets_and_their_probabilities_are_the_ordered_draws_grouped():
    counts = multisets(4, 3)
    assert len(counts) == 20 and len({tuple(c.tolist()) for c in counts}) == 20
    assert (counts.sum(1) == 3).all() and (counts >= 0).all()
    p = torch.softmax(LOGITS.double(), 0)
    by_counts: dict[tuple, float] = {}
    for seq in itertools.product(range(4), repeat=3):
        key = tuple(torch.bincount(torch.tensor(seq), minlength=4).tolist())
        by_counts[key] = by_counts.get(key, 0.0) + float(p[list(seq)].prod())
    probs = set_probabilities(LOGITS, counts)
    for c, prob in zip(counts, probs):
        assert float(prob) == pytest.approx(by_counts[tuple(c.tolist())], rel=1e-12)
    assert draws(torch.tensor([2, 0, 1])).tolist() == [0, 0, 2]
    assert [b.tolist() for b in set_order(3, 2, 3)] == [[0, 1], [2], [0, 1]]


def test_leave_one_out_and_reinforce_are_exactly_grad_j_where_dpg_is_not(tokenizer):
    """Full-batch steps: Phi(D, eps_i = 0) does not depend on x_i, so the leave-one-out update
    is grad J to rounding; so is REINFORCE's with a constant baseline. DPG's is not (lr 1)."""
    cmp = compare_gradients(LOGITS, _values(tokenizer, lr=1.0, steps=2))
    for name in ("leave_one_out", "dataset_reinforce"):
        assert cmp.estimators[name].relative_error < 1e-10, name
    assert cmp.estimators["dpg"].relative_error > 0.05
    # softmax: no gradient along (1, ..., 1), to rounding of Phi ~ 13
    assert cmp.true_gradient.sum().abs() < 1e-12 * cmp.true_gradient.norm()


def test_dpg_converges_to_grad_j_as_the_inner_lr_vanishes(tokenizer):
    big = compare_gradients(LOGITS, _values(tokenizer, lr=1.0, steps=3)).estimators["dpg"]
    small = compare_gradients(LOGITS, _values(tokenizer, lr=0.003, steps=3)).estimators["dpg"]
    assert small.cosine > 0.999 and small.relative_error < 0.05, small
    assert 1 - small.cosine < (1 - big.cosine) / 10, (small, big)


def test_a_wrong_estimator_is_caught(tokenizer):
    values = _values(tokenizer, lr=0.003, steps=1)
    values.rewards["flipped"] = -values.rewards["dpg"]
    values.rewards["shuffled"] = values.rewards["dpg"][:, [2, 0, 1]]
    cmp = compare_gradients(LOGITS, values)
    assert cmp.estimators["dpg"].cosine > 0.999
    assert cmp.estimators["flipped"].cosine < -0.99
    assert cmp.estimators["shuffled"].relative_error > 0.1


def test_the_reinforce_baseline_minimises_its_variance(tokenizer):
    values = _values(tokenizer, lr=0.3, steps=1)
    cmp = compare_gradients(LOGITS, values)
    b = cmp.baseline
    p = torch.softmax(LOGITS.double(), 0)
    probs = set_probabilities(LOGITS, values.counts)
    score = values.counts.double() - 3 * p

    def variance(baseline: float) -> float:
        g = (values.phi - baseline)[:, None] * score
        return float(probs @ (g * g).sum(1)) - float((probs @ g).norm()) ** 2

    assert variance(b) == pytest.approx(cmp.estimators["dataset_reinforce"].variance, rel=1e-9)
    delta = 0.01 * abs(b)
    assert variance(b) < variance(b + delta) and variance(b) < variance(b - delta)
