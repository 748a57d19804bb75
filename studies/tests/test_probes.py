"""The research probes (``studies/qr_oracle.py``, ``studies/uuid_reward_probe.py``): the QR
oracle's linear model is the real inner SFT, it refuses settings where it is not, and the UUID
probe's batch keeps the UUID out where it says it does."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.dpg_step import build
from dpg_lightning.metrics.patterns import LMHeadPattern
from studies import qr_oracle, uuid_reward_probe

ROOT = Path(__file__).resolve().parents[2]

QR = str(ROOT / "configs/tiny/qr_long.yaml")


@pytest.fixture(scope="module")
def qr_model():
    torch.manual_seed(0)
    model, _, _ = build(QR)
    return model


@pytest.mark.parametrize("length, lr", [(1, 1.0), (3, 100.0)])
def test_qr_oracle_linear_model_is_the_real_sft(qr_model, length, lr):
    inner = dataclasses.replace(qr_model.inner,
                                optim=dataclasses.replace(qr_model.inner.optim, lr=lr))
    texts = qr_oracle.candidates(length, 200, seed=0)
    rows = inner.tokenize(texts, qr_model.target_tokenizer)
    tokens = (rows.labels != -100).sum(1)
    g = qr_oracle.patch_gradients(qr_model.target, qr_model.metric, rows)
    linear, real = qr_oracle.linear_and_real_phi(qr_model, inner, texts, g, tokens, 64, seed=1)
    assert abs(linear - real) < 1e-5 * max(1.0, abs(real)), (linear, real)
    # and it is not trivially equal: the batch moved Phi away from its untouched value
    assert abs(real - float(qr_model.metric(qr_model.target))) > 1e-3


def test_qr_oracle_linear_model_follows_the_paper_orientation(qr_model):
    """``hidden_rows`` (the paper's): image rows are hidden units, columns vocabulary ids."""
    metric = LMHeadPattern(image="67", row_offset=3, col_offset=100, orientation="hidden_rows",
                           ink_sign=-1)
    metric.setup(qr_model.target)
    model = SimpleNamespace(target=qr_model.target, metric=metric,
                            target_tokenizer=qr_model.target_tokenizer)
    texts = qr_oracle.candidates(3, 200, seed=0)
    rows = qr_model.inner.tokenize(texts, qr_model.target_tokenizer)
    tokens = (rows.labels != -100).sum(1)
    g = qr_oracle.patch_gradients(qr_model.target, metric, rows)
    assert g.shape[1:] == metric.shape
    linear, real = qr_oracle.linear_and_real_phi(model, qr_model.inner, texts, g, tokens, 64, 1)
    assert abs(linear - real) < 1e-5 * max(1.0, abs(real)), (linear, real)


def test_qr_oracle_refuses_settings_its_model_does_not_cover(qr_model):
    adam = dataclasses.replace(qr_model.inner, optim=dataclasses.replace(
        qr_model.inner.optim, name="adam"))
    with pytest.raises(SystemExit, match="needs 'sgd'"):
        qr_oracle.check_preconditions(qr_model, adam)
    everything = dataclasses.replace(qr_model.inner, train_params="all")
    with pytest.raises(SystemExit, match="needs 'lm_head'"):
        qr_oracle.check_preconditions(qr_model, everything)
    qr_oracle.check_preconditions(qr_model, qr_model.inner)  # the shipped config is covered


@pytest.mark.parametrize("noisy_batch", [0, 64])
def test_qr_oracle_search_raises_the_phi_it_optimizes(qr_model, noisy_batch):
    """Clean: MetricFn of the expected update. Noisy: the mean Phi of sampled batches of that size
    (true multinomial counts through the linear model), which is what it optimizes."""
    texts = qr_oracle.candidates(1, 200, seed=0)
    rows = qr_model.inner.tokenize(texts, qr_model.target_tokenizer)
    g = qr_oracle.patch_gradients(qr_model.target, qr_model.metric, rows)
    flat, tokens = g.reshape(len(g), -1), float((rows.labels[0] != -100).sum())

    def phi(pi):
        if noisy_batch:
            gen = torch.Generator().manual_seed(1)
            counts = torch.stack([torch.bincount(torch.multinomial(
                pi, noisy_batch, replacement=True, generator=gen), minlength=len(pi))
                for _ in range(200)]).float() / noisy_batch
        else:
            counts = pi[None]
        delta = (10.0 * counts @ flat / tokens).reshape(-1, *qr_model.metric.shape)
        return float(qr_model.metric.of_delta(delta))

    uniform = torch.full((len(texts),), 1.0 / len(texts))
    torch.manual_seed(0)
    found = qr_oracle.optimize(g, tokens, 10.0, qr_model.metric, 200, noisy_batch)
    assert phi(found) > phi(uniform) + 0.05
    if noisy_batch:  # and it pays to model the noise: the clean optimum does worse on batches
        torch.manual_seed(0)
        clean = qr_oracle.optimize(g, tokens, 10.0, qr_model.metric, 200)
        assert phi(found) > phi(clean) + 0.02


def test_uuid_probe_random_uuids_share_no_4gram_with_the_target():
    uuid = "4f3c2a1e-9b7d-4e2f-8a6c-0d5e7b9c1f23"
    grams = {uuid[i:i + 4] for i in range(len(uuid) - 3)}
    batch = uuid_reward_probe.probe_batch(uuid, ["a prompt"] * 12, random.Random(0))
    randoms = [t for kind, t in batch if kind == "random UUID"]
    assert len(randoms) == 12
    assert not any(u[i:i + 4] in grams for u in randoms for i in range(len(u) - 3))
    corpus = uuid_reward_probe.random_uuids(400, uuid, random.Random(1))  # the pretraining set
    assert not any(u[i:i + 4] in grams for u in corpus for i in range(len(u) - 3))
    shuffled = [t for kind, t in batch if kind == "shuffled"]
    assert all(sorted(s.replace("-", "")) == sorted(uuid.replace("-", "")) for s in shuffled)
    assert sum(kind == "exact" for kind, _ in batch) == 4
