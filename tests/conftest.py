"""Shared fixtures: tiny models (no downloads) and a truly-float64 Llama for finite differences."""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.inner import run_sft
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core box two threads per
# test process were seen to be ~50x slower than one.
torch.set_num_threads(1)


TEXTS = ["hello world", "abc", "the cat sat", "zz top", "qwerty!", "a"]
#: Inner optimizers the metagradient tests run; files parametrize over the subsets they need.
OPTIMS = {
    "sgd": InnerOptimConfig("sgd", lr=0.5),
    "sgd_momentum": InnerOptimConfig("sgd", lr=0.2, momentum=0.9, weight_decay=0.01),
    "adam": InnerOptimConfig("adam", lr=1e-2, eps_root=1e-8, weight_decay=0.01),
    "adamw": InnerOptimConfig("adamw", lr=1e-2, eps_root=1e-8, weight_decay=0.1),
}


def finite_difference_rewards(target, data, phi, cfg, order, h=1e-5):
    """Central differences of Phi(SFT(eps)) per example, re-running the real (plain) SFT."""
    out = []
    for i in range(len(data)):
        values = []
        for sign in (1.0, -1.0):
            eps = torch.ones(len(data), dtype=torch.float64)
            eps[i] += sign * h
            values.append(run_sft(target, data, eps, phi, cfg, order, create_graph=False)[0])
        out.append((values[0] - values[1]) / (2 * h))
    return torch.stack(out).detach()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig())


def tiny(arch: str = "gpt2", dtype: str = "float64", **kw):
    """A tiny frozen target (the inner loop never trains the module in place)."""
    cfg = ModelConfig(
        arch=arch,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        dtype=dtype,
        **kw,
    )
    return build_model(cfg, len(load_tokenizer(cfg))).requires_grad_(False)


@pytest.fixture
def float64_llama(monkeypatch):
    """Make Llama compute in float64 end to end, so finite differences have float64 accuracy.

    transformers' Llama upcasts to float32 inside RMSNorm and the eager attention softmax (a
    no-op in fp32, a precision *loss* in float64): a central difference with h=1e-5 would then
    measure float32 rounding noise, not the derivative. The replacements below are the same
    math without the casts; they touch only these tests, never the library.
    """
    import transformers.models.llama.modeling_llama as ml

    def rms_forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = w.softmax(-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ml, "eager_attention_forward", eager)
