"""Shared pytest fixtures: the tokenizer and a truly-float64 Llama for finite differences.

Plain helpers (tiny models, optimizers, finite differences, tiny-fit arguments) live in
tests/helpers.py; tests import those from there, never from this file.
"""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.models.build import ModelConfig, load_tokenizer

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core box two threads per
# test process were seen to be ~50x slower than one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig())


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
