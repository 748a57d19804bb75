"""Memory knobs of the inner SFT: bf16 autocast and activation checkpointing.

Why these tests: both knobs change *how* the inner forward is computed, and a wrong metagradient
is silent (training still runs). ``autocast: none`` must leave the computation bit for bit as it
was; ``bf16`` is an approximation, so it is held to a strong correlation with fp32 rewards (what
a policy gradient with group baselines needs: the ranking of examples) rather than to equality;
activation checkpointing is exact, so it is held to 1e-10 in float64 (the issue warns that
checkpointing inside a functional call can silently give wrong gradients).
"""

from __future__ import annotations

import random

import pytest
import torch

from dpg_lightning.data.tokenization import TokenRows, tokenize_examples
from dpg_lightning.inner import (
    InnerConfig,
    RankOrder,
    inner_order,
    metagradient_rewards,
    per_example_loss,
    run_sft,
    unrolled,
)
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import OPTIMS as ALL_OPTIMS
from tests.helpers import TEXTS, relative_error, tiny

OPTIMS = {k: ALL_OPTIMS[k] for k in ("sgd", "adam")}


def _pre_knob_batch_loss(forward, data: TokenRows, idx, eps, *_ignored):
    """The step loss as it was before the knobs were added (the bit-identity reference)."""
    idx = idx.to(data.input_ids.device)
    local = idx[idx >= 0]
    weight = eps[local]
    if len(local) == 0:
        local, weight = idx.new_zeros(1), eps[:1] * 0
    logits = forward(data.input_ids[local], data.attention_mask[local]).logits
    losses = per_example_loss(logits.to(eps.dtype), data.labels[local])
    return (weight * losses).sum() / len(idx)



def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghij klmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 20))) for _ in range(n)]


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_autocast_none_is_bit_identical_to_before(backend, tokenizer, monkeypatch):
    target = tiny(dtype="float32")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, True, 0)
    cfg = InnerConfig(optim=OPTIMS["adam"], batch_size=2, backend=backend, autocast="none")
    new = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
    monkeypatch.setattr(unrolled, "step_loss", _pre_knob_batch_loss)
    old = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
    assert torch.equal(new.rewards, old.rewards) and torch.equal(new.phi, old.phi)


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_bf16_rewards_correlate_with_fp32(backend, tokenizer):
    # init_std 0.2 as in configs/tiny: wide logits, so rewards differ clearly between examples.
    target = tiny(dtype="float32", init_std=0.2)
    data = tokenize_examples(_random_texts(32, 0), tokenizer, 32)
    order = inner_order(len(data), 8, True, 0)  # 4 inner steps
    rewards = {}
    for autocast in ("none", "bf16"):
        cfg = InnerConfig(
            optim=OPTIMS["sgd"], batch_size=8, backend=backend, autocast=autocast
        )
        out = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
        rewards[autocast], phi = out.rewards, out.phi
        assert phi.dtype == torch.float32 and rewards[autocast].dtype == torch.float32
    pearson = torch.corrcoef(torch.stack([rewards["none"], rewards["bf16"]]))[0, 1]
    assert pearson > 0.9, f"bf16/fp32 reward correlation {pearson:.3f}"
    assert not torch.equal(rewards["none"], rewards["bf16"])  # bf16 really was applied


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_is_exact(arch, optim, tokenizer, float64_llama):
    target = tiny(arch)
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, True, 0)  # 3 inner steps
    phi = LMHeadL2Norm()
    out = {}
    for ckpt in (False, True):
        cfg = InnerConfig(
            optim=OPTIMS[optim], batch_size=2, backend="func", activation_checkpointing=ckpt
        )
        attributed = metagradient_rewards(target, data, phi, cfg, RankOrder(order))
        out[ckpt] = attributed.rewards, attributed.phi
    assert out[True][0].dtype == torch.float64
    assert out[False][0].abs().max() > 0
    assert relative_error(out[True][0], out[False][0]) < 1e-10
    assert relative_error(out[True][1], out[False][1]) < 1e-10
    # Plain SFT (validation, dataset reward) goes through the same path.
    eps = torch.ones(len(data), dtype=torch.float64)
    plain = [
        run_sft(target, data, eps, phi, InnerConfig(
            optim=OPTIMS[optim], batch_size=2, backend="func", activation_checkpointing=c
        ), order, create_graph=False)[0]
        for c in (False, True)
    ]
    assert relative_error(plain[1], plain[0]) < 1e-10


@pytest.mark.parametrize("backend", ["higher", "replay"])
def test_activation_checkpointing_refused_where_not_implemented(backend):
    with pytest.raises(ValueError, match="activation_checkpointing"):
        InnerConfig(batch_size=2, backend=backend, activation_checkpointing=True)


def test_autocast_refused_on_replay():
    with pytest.raises(ValueError, match="autocast"):
        InnerConfig(batch_size=2, backend="replay", autocast="bf16")
