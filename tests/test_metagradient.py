"""DPG rewards = exact dPhi/deps_i, checked against central finite differences of the real SFT.

Float64 throughout. Settings and why: h = 1e-5 (central differences have O(h^2) truncation
error, ~1e-10 relative here, and O(1e-16/h) rounding error); Adam/AdamW use eps_root = 1e-8:
at the first Adam step m/sqrt(v) ~ sign(g), whose derivative is ~0 except through eps, so the
metagradient is ill-conditioned and sqrt'(v) blows up where v = 0 (untouched embedding rows);
eps_root keeps it finite and smooth. Measured worst relative errors are ~1e-9 (SGD) to ~1e-6
(Adam); the bound asserted is 1e-4 per example.
"""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import (
    InnerConfig,
    RankOrder,
    inner_order,
    metagradient_rewards,
)
from dpg_lightning.inner.set_size import SFTSet
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import OPTIMS as ALL_OPTIMS
from tests.helpers import TEXTS, finite_difference_rewards, tiny

OPTIMS = {k: ALL_OPTIMS[k] for k in ("sgd", "adam", "adamw")}


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rewards_match_finite_differences_on_both_backends(arch, optim, tokenizer, float64_llama):
    # gpt2: tied LM head (listed once, as the input embedding); llama: untied head.
    target = tiny(arch)
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, True, 0)  # 3 inner steps
    phi = LMHeadL2Norm()
    rewards = {}
    for backend in ("higher", "func"):
        cfg = InnerConfig(optim=OPTIMS[optim], batch_size=2, backend=backend)
        out = metagradient_rewards(target, data, phi, cfg, RankOrder(order))
        rewards[backend] = out.rewards
        assert len(out.losses) == 3
    fd = finite_difference_rewards(target, data, phi, cfg, order)
    for backend, r in rewards.items():
        rel = ((r - fd).abs() / fd.abs()).max().item()
        assert rel < 1e-4, f"{backend}: relative error {rel:.2e}"
    torch.testing.assert_close(rewards["higher"], rewards["func"], rtol=1e-9, atol=0)


def test_lm_head_only_training_on_untied_llama(tokenizer, float64_llama):
    target = tiny("llama")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 3, True, 1)
    cfg = InnerConfig(optim=OPTIMS["adamw"], batch_size=3, train_params="lm_head", backend="higher")
    r = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order)).rewards
    fd = finite_difference_rewards(target, data, LMHeadL2Norm(), cfg, order)
    assert ((r - fd).abs() / fd.abs()).max() < 1e-4


def test_target_weights_are_never_modified(tokenizer):
    target = tiny("gpt2")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    data = tokenize_examples(TEXTS, tokenizer, 32)
    cfg = InnerConfig(optim=OPTIMS["adam"], batch_size=2)
    metagradient_rewards(target, data, LMHeadL2Norm(), cfg,
                         RankOrder(inner_order(len(data), 2, True, 0)))
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inner_batch_larger_than_set_is_rejected():
    with pytest.raises(ValueError, match="an inner batch of 5 over 4 examples"):
        inner_order(4, 5, True, 0)
    with pytest.raises(ConfigError, match="`inner.batch_size` is 5 .* 4 examples"):
        SFTSet(2, 2).batch(5)
