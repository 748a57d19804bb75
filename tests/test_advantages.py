"""Baselines and scale-free normalisation of advantages."""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.dpg.advantages import compute_advantages


def test_group_baseline_and_scaling_per_prompt():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0], dtype=torch.float64)
    adv = compute_advantages(r, 3, "group", "group")
    g = r.reshape(2, 3)
    expected = (g - g.mean(1, keepdim=True)) / g.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(adv, expected.reshape(-1))
    assert torch.allclose(adv.reshape(2, 3).sum(1), torch.zeros(2, dtype=torch.float64))


def test_scaling_is_scale_free_for_tiny_metagradients():
    r = torch.tensor([1e-9, 3e-9, -2e-9, 5e-9], dtype=torch.float64)
    tiny = compute_advantages(r, 4, "group", "group")
    unit = compute_advantages(r * 1e9, 4, "group", "group")
    torch.testing.assert_close(tiny, unit)
    assert tiny.abs().max() > 0.5  # a fixed +1e-6 in the denominator would give ~1e-3


def test_all_equal_rewards_give_zero_advantage_without_nan():
    for r in (torch.full((6,), 0.3), torch.zeros(6), torch.full((6,), 1e-9)):
        for baseline in ("group", "batch_mean", "leave_one_out"):
            for scale in ("group", "batch", "none"):
                adv = compute_advantages(r, 3, baseline, scale)
                assert torch.isfinite(adv).all()
                assert torch.equal(adv, torch.zeros_like(adv)), (baseline, scale)


def test_group_of_size_one_gives_zero_advantage():
    adv = compute_advantages(torch.tensor([1.0, -2.0, 5.0]), 1, "group", "group")
    assert torch.equal(adv, torch.zeros(3))


def test_leave_one_out_and_batch_mean():
    r = torch.tensor([1.0, 2.0, 6.0])
    loo = compute_advantages(r, 3, "leave_one_out", "none")
    torch.testing.assert_close(loo, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    bm = compute_advantages(r, 1, "batch_mean", "none")
    torch.testing.assert_close(bm, r - 3.0)
    assert torch.equal(compute_advantages(r, 3, "none", "none"), r)


def test_batch_scaling_uses_batch_std():
    r = torch.tensor([0.0, 2.0, 4.0, 6.0])
    adv = compute_advantages(r, 2, "batch_mean", "batch")
    torch.testing.assert_close(adv, (r - 3.0) / r.std(unbiased=False))


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="baseline"):
        compute_advantages(torch.ones(2), 2, "median", "none")
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(torch.ones(2), 2, "none", "max")
