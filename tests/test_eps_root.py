"""Issue 22, point 1: inner Adam/AdamW give finite rewards by default, and a run that diverges
says why.

``eps_root`` 0 makes Adam's metagradient NaN wherever a second moment is 0 (a parameter no
inner batch gives a gradient: embeddings of tokens absent from the set), whatever the inner lr.
The default is the paper's 1e-9: the README's ``--model.inner.optim.name adamw`` variation
trains, its rewards still equal finite differences, and SGD (which never reads ``eps_root``)
is unchanged. When a run does diverge, the message names what was non-finite and the likely
cause, not only "lower the lr".
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from dpg_lightning.cli import main
from dpg_lightning.common.errors import TrainingDiverged
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import InnerConfig, RankOrder, inner_order, metagradient_rewards
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.run.divergence import DivergenceGuard, StepNumbers, check_validation_phi
from tests.helpers import TEXTS, TINY_CONFIG, finite_difference_rewards, tiny, tiny_fit_args


def _rewards(optim: InnerOptimConfig, tokenizer, backend: str = "func"):
    target = tiny("gpt2")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, True, 0)
    cfg = InnerConfig(optim=optim, batch_size=2, backend=backend)
    return metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order)).rewards, (
        target, data, cfg, order)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_default_adam_metagradient_is_finite_and_exact(name, tokenizer):
    """The default config's rewards are finite (eps_root 0's are NaN: the byte vocabulary has
    tokens no example holds) and equal central finite differences of the real SFT."""
    assert InnerOptimConfig(name).eps_root == 1e-9
    nan, _ = _rewards(InnerOptimConfig(name, lr=1e-2, eps_root=0.0), tokenizer)
    assert not torch.isfinite(nan).all()
    rewards, (target, data, cfg, order) = _rewards(InnerOptimConfig(name, lr=1e-2), tokenizer)
    assert torch.isfinite(rewards).all()
    fd = finite_difference_rewards(target, data, LMHeadL2Norm(), cfg, order)
    rel = ((rewards - fd).abs() / fd.abs()).max().item()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_sgd_ignores_eps_root(tokenizer):
    """The new default leaves SGD runs bit for bit as they were."""
    a, _ = _rewards(InnerOptimConfig("sgd", lr=0.5), tokenizer)
    b, _ = _rewards(InnerOptimConfig("sgd", lr=0.5, eps_root=0.0), tokenizer)
    assert torch.equal(a, b)


def _guard(optim: InnerOptimConfig, **inner) -> DivergenceGuard:
    return DivergenceGuard(1, [("model.inner.optim.lr", optim.lr)],
                           InnerConfig(optim=optim, **inner))


def test_nan_rewards_with_adam_eps_root_zero_name_the_cause():
    guard = _guard(InnerOptimConfig("adam", lr=1e-3, eps_root=0.0))
    nan_rewards = torch.tensor([1.0, float("nan"), float("nan"), 2.0])
    guard.record_step(4, StepNumbers(nan_rewards, torch.ones(1), [torch.tensor([2.0, 1.5])]))
    with pytest.raises(TrainingDiverged) as info:
        guard.raise_if_diverged()
    message = str(info.value)
    assert "2 of 4 rewards" in message
    assert "adam with `model.inner.optim.eps_root` 0" in message
    assert "second moment is 0" in message and "eps_root: 1e-9" in message


def test_growing_inner_loss_names_the_inner_lr():
    guard = _guard(InnerOptimConfig("sgd", lr=3.0))
    losses = [torch.tensor([2.0]), torch.tensor([50.0]), torch.tensor([float("inf")])]
    guard.record_step(2, StepNumbers(torch.full((4,), float("nan")), torch.ones(1), losses))
    with pytest.raises(TrainingDiverged, match=r"(?s)inner loss at 1 of 3 inner steps.*"
                       r"Likely cause: the inner SFT diverged.*inner step 2.*lr` \(now 3\) is "
                       r"too large"):
        guard.raise_if_diverged()
    grew = StepNumbers(torch.tensor([float("nan")]), torch.ones(1),
                       [torch.tensor([1.0]), torch.tensor([9.0])])
    guard.record_step(3, grew)
    with pytest.raises(TrainingDiverged, match=r"inner loss grew over the SFT \(1 -> 9\)"):
        guard.raise_if_diverged()


def test_rewards_overflow_with_autocast_names_both():
    guard = _guard(InnerOptimConfig("adamw", lr=1e-3), autocast="bf16")
    guard.record_step(1, StepNumbers(torch.tensor([float("inf")]), torch.ones(1),
                                     [torch.tensor([2.0, 1.0])]))
    with pytest.raises(TrainingDiverged, match=r"(?s)metagradient.*overflowed.*autocast: bf16"):
        guard.raise_if_diverged()


def test_validation_phi_message_keeps_the_old_form_without_causes():
    with pytest.raises(TrainingDiverged, match=r"validation Phi is nan at step 3.*lr` \(now 0.1"):
        check_validation_phi(math.nan, 3, [("model.inner.optim.lr", 0.1)])


def _skipped_and_rewards(root: Path) -> tuple[int, list[float]]:
    with next(root.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    skipped = sum(1 for r in rows if r.get("train/skipped_nonfinite"))
    return skipped, [float(r["train/reward_mean"]) for r in rows if r.get("train/reward_mean")]


def test_readme_adamw_variation_trains(tmp_path):
    """``fit --config configs/tiny/l2_norm.yaml --model.inner.optim.name adamw`` (shrunk to two
    steps) updates the generator on finite rewards; with ``eps_root: 0`` every step is
    skipped (what the issue saw)."""
    steps = ("--trainer.max_steps=2", "--trainer.val_check_interval=2")
    main(["fit", "--config", TINY_CONFIG,
          *tiny_fit_args("--model.inner.optim.name=adamw", *steps, root=tmp_path / "default")])
    skipped, rewards = _skipped_and_rewards(tmp_path / "default")
    assert skipped == 0 and len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    main(["fit", "--config", TINY_CONFIG,
          *tiny_fit_args("--model.inner.optim.name=adamw", "--model.inner.optim.eps_root=0",
                         *steps, root=tmp_path / "zero")])
    assert _skipped_and_rewards(tmp_path / "zero") == (2, [])
