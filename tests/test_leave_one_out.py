"""Leave-one-out differences (``analysis/leave_one_out.py``) and reward agreement
(``analysis/agreement.py``).

The leave-one-out difference is computed in float64 on a copy of a float32 tiny target; at a
small inner lr ``Phi`` is nearly linear in ``eps``, so the exact reward must track it
(Pearson > 0.9, asserted), while the same rewards shuffled among the examples must not.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpg_lightning.analysis.agreement import agreement, ranks, scatter_figure, write_report
from dpg_lightning.analysis.inner_calls import exact_rewards
from dpg_lightning.analysis.leave_one_out import as_float64, leave_one_out, remove_example
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import InnerConfig, InnerOptimConfig, inner_order
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import TEXTS, tiny

MORE = TEXTS + ["a b c d", "lorem ipsum", "!!", "the dog ran off", "xyzzy", "0123456789"]


@pytest.fixture(scope="module")
def small_lr_case(tokenizer):
    target = tiny("gpt2", dtype="float32", init_std=0.2)
    data = tokenize_examples(MORE, tokenizer, 32)
    cfg = InnerConfig(optim=InnerOptimConfig("sgd", lr=0.05), batch_size=3, backend="func")
    order = inner_order(len(data), 3, True, 0)
    loo = leave_one_out(target, data, LMHeadL2Norm(), cfg, order)
    rewards, phi, _ = exact_rewards(as_float64(target), data, LMHeadL2Norm(), cfg, order)
    assert float(phi) == loo.phi
    return rewards, loo


def test_exact_rewards_track_leave_one_out_at_a_small_lr(small_lr_case):
    rewards, loo = small_lr_case
    assert loo.dtype == "float64" and loo.differences.abs().min() > 1e3 * loo.floor
    stats = agreement(rewards, loo.differences)
    assert stats.pearson > 0.9 and stats.spearman > 0.9, stats
    assert stats.relative_error < 0.2, stats  # measured 0.054; signs differ near zero


def test_rewards_shuffled_among_examples_do_not(small_lr_case):
    rewards, loo = small_lr_case
    gen = torch.Generator().manual_seed(0)
    shuffled = [agreement(rewards[torch.randperm(len(rewards), generator=gen)], loo.differences)
                for _ in range(20)]
    assert sum(abs(s.pearson) for s in shuffled) / len(shuffled) < 0.5
    reversed_ranks = rewards.sort().values.flip(0)[ranks(rewards).long() - 1]
    assert agreement(reversed_ranks, loo.differences).spearman < -0.9


def test_removing_an_example_alone_in_its_batch_is_zeroing_its_weight(tokenizer):
    """Plain SGD, no weight decay: a step whose only example has weight 0 changes nothing,
    so dropping that step is the same SFT."""
    target = tiny("gpt2")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    cfg = InnerConfig(optim=InnerOptimConfig("sgd", lr=0.5), batch_size=1, backend="func")
    order = inner_order(len(data), 1, True, 0)
    zero = leave_one_out(target, data, LMHeadL2Norm(), cfg, order, [0, 3])
    removed = leave_one_out(target, data, LMHeadL2Norm(), cfg, order, [0, 3], variant="remove")
    torch.testing.assert_close(zero.differences, removed.differences, rtol=1e-9, atol=0)
    assert (zero.differences.abs() > 1e6 * zero.floor).all()


def test_removing_an_example_from_a_larger_batch_changes_its_divisor(tokenizer):
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = [torch.tensor([4, 1, 0]), torch.tensor([2, 5, 3])]
    rows, sub = remove_example(data, order, 1)
    assert [o.tolist() for o in sub] == [[3, 0], [1, 4, 2]]
    assert torch.equal(rows.input_ids, data.input_ids[[0, 2, 3, 4, 5]])
    cfg = InnerConfig(optim=InnerOptimConfig("sgd", lr=0.5), backend="func")
    zero = leave_one_out(tiny("gpt2"), data, LMHeadL2Norm(), cfg, order, [1])
    removed = leave_one_out(tiny("gpt2"), data, LMHeadL2Norm(), cfg, order, [1], "remove")
    assert (zero.differences - removed.differences).abs().max() > 1e3 * zero.floor


def test_agreement_statistics_on_known_vectors():
    x = torch.tensor([1.0, 2.0, 3.0, -1.0])
    stats = agreement(x, 2 * x)
    assert stats.pearson == pytest.approx(1.0) and stats.spearman == pytest.approx(1.0)
    assert stats.slope_origin == pytest.approx(2.0) and stats.slope == pytest.approx(2.0)
    assert stats.intercept == pytest.approx(0.0, abs=1e-12)
    assert stats.relative_error == pytest.approx(0.5) and stats.sign_agreement == 1.0
    shifted = agreement(x, x + 10)
    assert shifted.slope == pytest.approx(1.0) and shifted.intercept == pytest.approx(10.0)
    assert shifted.slope_origin > 1.0 and shifted.sign_agreement == 0.75
    assert torch.equal(ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([3.5, 1, 3.5, 2]))
    assert agreement(x, -x).spearman == pytest.approx(-1.0)


def test_report_and_figure(tmp_path, small_lr_case):
    rewards, loo = small_lr_case
    stats = agreement(rewards, loo.differences)
    write_report(tmp_path / "r.json", rewards, loo.differences, stats, {"seed": 0})
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rewards"] == pytest.approx(rewards.tolist())
    assert report["statistics"]["pearson"] == pytest.approx(stats.pearson)
    assert report["settings"] == {"seed": 0} and len(report["leave_one_out"]) == len(rewards)
    scatter_figure(rewards, loo.differences, stats).savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
