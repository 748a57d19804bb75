"""The policy loss is an unbiased estimator of grad E[reward] (enumerable policy)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dpg_lightning.advantages import compute_advantages
from dpg_lightning.policy import policy_loss
from dpg_lightning.rollout import token_logprobs

V, T = 3, 2  # vocabulary 3, sequences of 2 tokens: 9 enumerable sequences


def _reward(seq: torch.Tensor) -> torch.Tensor:
    return (seq[..., 0] == 1).double() * 2.0 + (seq[..., 1] == seq[..., 0]).double() - 0.5


def _logits(theta: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Autoregressive toy policy: first-token logits theta[0], second depends on the first."""
    first = theta[0].expand(seq.shape[0], V)
    second = theta[1 + seq[:, 0]]
    return torch.stack([first, second], 1)


def _exact_gradient(theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_()
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    logp = token_logprobs(_logits(theta, seqs), seqs).sum(1)
    (grad,) = torch.autograd.grad((logp.exp() * _reward(seqs)).sum(), theta)
    return grad


def _sample(theta: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    first = torch.multinomial(theta[0].softmax(-1), n, replacement=True, generator=gen)
    second = torch.multinomial(theta[1 + first].softmax(-1), 1, generator=gen).squeeze(1)
    return torch.stack([first, second], 1)


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
@pytest.mark.parametrize("epsilon", [None, 0.2])
def test_policy_gradient_is_unbiased(baseline, epsilon):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(1 + V, V, dtype=torch.float64, generator=gen)
    exact = _exact_gradient(theta)
    estimates = []
    for _ in range(400):
        seq = _sample(theta, 8, gen)
        param = theta.clone().requires_grad_()
        logp = token_logprobs(_logits(param, seq), seq)
        adv = compute_advantages(_reward(seq), 8, baseline, "none")
        loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones_like(logp), epsilon)
        (g,) = torch.autograd.grad(-loss, param)
        estimates.append(g)
    est = torch.stack(estimates)
    mean, sem = est.mean(0), est.std(0) / len(est) ** 0.5
    # Unbiased: every coordinate within 4 standard errors of the exact gradient.
    assert ((mean - exact).abs() <= 4 * sem + 1e-12).all(), (mean, exact, sem)
    assert exact.abs().max() > 10 * sem.max()  # and the test can tell a wrong gradient apart


def test_clipping_stops_gradient_beyond_the_trust_region():
    logp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])  # ratio e > 1.2
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2)
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == 0.0 and stats["clip_frac"].item() == 1.0


def test_kl_penalty_is_zero_at_the_reference_and_positive_away():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    _, at_ref = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), None, logp, beta=0.1)
    _, away = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), None, logp - 0.3, beta=0.1)
    assert at_ref["kl"].item() == 0.0 and away["kl"].item() > 0.0
