"""Model loading (local checkpoints) and the start-up checks on metrics and settings."""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.inner import trainable_names
from dpg_lightning.metrics.base import check_metric
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.models.build import ModelConfig, _check_vocab, build_model, load_tokenizer
from tests.helpers import tiny


def test_local_checkpoint_loads_with_eager_attention_and_no_dropout(tmp_path):
    cfg = ModelConfig(arch="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok))
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = build_model(ModelConfig(pretrained=str(tmp_path / "m")), len(tok))
    assert loaded.config._attn_implementation == "eager"
    assert loaded.config.attention_dropout == 0.0
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert len(load_tokenizer(ModelConfig(pretrained=str(tmp_path / "m")))) == len(tok)


def test_vocab_smaller_than_tokenizer_is_rejected():
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = build_model(cfg, 100)  # e.g. a checkpoint trained with a 100-token vocabulary
    with pytest.raises(ValueError, match="100 token embeddings but its tokenizer has 259"):
        _check_vocab(model, cfg, 259)


def test_train_params_selection():
    gpt2, llama = tiny("gpt2"), tiny("llama")
    assert trainable_names(gpt2, "lm_head") == ["transformer.wte.weight"]  # tied head
    assert trainable_names(llama, "lm_head") == ["lm_head.weight"]
    assert all("layers.1" in n for n in trainable_names(llama, r"layers\.1\."))
    with pytest.raises(ValueError, match="inner.train_params"):
        trainable_names(llama, "nothing_matches")


def test_metric_must_be_scalar_with_grad_path():
    target = tiny("llama")
    names = trainable_names(target, "all")
    assert check_metric(LMHeadL2Norm(), target, names) < 0
    with pytest.raises(ValueError, match="scalar"):
        check_metric(lambda t: t.lm_head.weight.sum(1), target, names)
    with pytest.raises(ValueError, match="no gradient path"):
        check_metric(lambda t: t.lm_head.weight.detach().sum(), target, names)
    with pytest.raises(ValueError, match="no gradient path"):  # reads only frozen weights
        check_metric(LMHeadL2Norm(), target, trainable_names(target, r"layers\.0\."))
    with pytest.raises(ValueError, match="finite"):
        check_metric(lambda t: t.lm_head.weight.sum() * float("nan"), target, names)
