"""The policy loss is an unbiased estimator of grad E[reward] (enumerable policy)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.dpg.advantages import compute_advantages
from dpg_lightning.dpg.policy import PolicyConfig, accumulate_policy_loss, policy_loss
from dpg_lightning.dpg.rollout import token_logprobs

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


@pytest.mark.parametrize("aggregation", ["sequence_sum", "token_mean"])
@pytest.mark.parametrize("micro", [1, 2, 3, 5])
def test_micro_batches_accumulate_the_unsplit_minibatch_gradient(aggregation, micro):
    """``policy.micro_batch_size`` is a memory knob only: the accumulated gradient, loss and
    stats equal the mini-batch's in one piece (float64), with ragged masks, a last partial
    micro-batch, the KL penalty and the dual clip."""
    gen = torch.Generator().manual_seed(0)
    n, t = 7, 4
    theta = torch.randn(n, t, 5, dtype=torch.float64, generator=gen)
    tokens = torch.randint(5, (n, t), generator=gen)
    mask = (torch.rand(n, t, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    old = token_logprobs(theta + 0.3 * torch.randn(theta.shape, generator=gen, dtype=theta.dtype),
                         tokens)
    ref = token_logprobs(theta.flip(0), tokens)
    adv = torch.randn(n, dtype=torch.float64, generator=gen)
    rows = torch.tensor([5, 0, 3, 6, 1])  # one mini-batch of the rollout, in a shuffled order
    kwargs = dict(epsilon=0.2, beta=0.1, dual_clip=3.0, aggregation=aggregation)

    def run(micro_batch_size):
        param = theta.clone().requires_grad_()
        grads = []

        def logprobs(chunk):
            return token_logprobs(param[chunk], tokens[chunk])

        def backward(loss):
            grads.append(torch.autograd.grad(loss, param)[0])

        loss, stats = accumulate_policy_loss(logprobs, backward, rows, old, adv, mask,
                                             micro_batch_size, ref, **kwargs)
        return loss, stats, torch.stack(grads).sum(0), len(grads)

    whole_loss, whole_stats, whole_grad, calls = run(None)
    assert calls == 1
    direct, _ = policy_loss(token_logprobs(theta[rows], tokens[rows]), old[rows], adv[rows],
                            mask[rows], ref_logp=ref[rows], **kwargs)
    assert float(whole_loss) == float(direct)  # one piece: exactly today's loss
    loss, stats, grad, calls = run(micro)
    assert calls == -(-len(rows) // micro)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-10, atol=1e-14)
    for k in whole_stats:
        torch.testing.assert_close(stats[k], whole_stats[k], rtol=1e-10, atol=1e-14)
    assert whole_grad.abs().max() > 1e-3 and whole_stats["kl"] > 0


def test_micro_batch_size_is_checked_when_parsed():
    with pytest.raises(ConfigError, match="`micro_batch_size`"):
        PolicyConfig(micro_batch_size=0)
