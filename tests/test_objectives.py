"""The shipped objectives (patterns, likelihoods, user metrics) and the experiment configs.

Fast: hand-made weights, the tiny byte-level models, and config parsing (no 1B model is built).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import per_example_loss
from dpg_lightning.metrics.base import Metric, check_metric
from dpg_lightning.metrics.likelihood import (
    DEFAULT_UUID,
    LastWordLikelihood,
    SequenceLikelihood,
    last_word_split,
)
from dpg_lightning.metrics.patterns import (
    SIXTY_SEVEN,
    LMHeadPattern,
    decode_qr,
    load_bitmap,
    qr_bitmap,
)
from dpg_lightning.metrics.user_metric import FunctionMetric
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer
from dpg_lightning.models.pretrain import pretrain, read_texts

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `examples.my_metric` imports from the repository root


class HeadOnly(nn.Module):
    """Just an LM head ``[vocab, hidden]``: enough for weight-space objectives."""

    def __init__(self, vocab: int = 12, hidden: int = 9) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(seed=1)
    tok = load_tokenizer(cfg)
    return build_model(cfg, len(tok)), tok


# ------------------------------------------------------------------ patterns


def test_pattern_phi_and_readout_match_hand_computation():
    target = HeadOnly()
    obj = LMHeadPattern(image="67", row_offset=2, col_offset=1, sharpness=20.0)
    obj.setup(target)
    assert obj(target).item() == pytest.approx(-math.log(2), abs=1e-6)  # D = 0
    s = torch.from_numpy(SIXTY_SEVEN * 2 - 1).float()
    d = 0.05 * s
    d[0, 0] = -d[0, 0]  # one wrong pixel out of 42
    with torch.no_grad():
        target.lm_head.weight[2:8, 1:8] += d
        target.lm_head.weight[0, 0] += 5.0  # outside the patch: ignored
    expected = -torch.log1p(torch.exp(-20 * s * d)).mean()
    assert obj(target).item() == pytest.approx(expected.item(), rel=1e-6)
    out = obj.readout(target)
    assert out["pixel_accuracy"] == pytest.approx(41 / 42)
    assert obj.pixels(target)[0, 0] == 1 - SIXTY_SEVEN[0, 0]


def test_pattern_gradient_path_and_tied_head(tiny):
    model, _ = tiny
    obj = LMHeadPattern(image="67", row_offset=100)
    obj.setup(model)
    # GPT-2 is tied: the head is the input embedding, and `lm_head` training selects it.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    phi0 = check_metric(obj, model, ["transformer.wte.weight"])
    assert phi0 == pytest.approx(-math.log(2), abs=1e-6)


def test_bitmaps_are_binary_with_the_right_shapes():
    assert SIXTY_SEVEN.shape == (6, 7) and set(np.unique(SIXTY_SEVEN)) == {0, 1}
    qr = qr_bitmap("DPG")
    assert qr.shape == (21, 21) and set(np.unique(qr)) == {0, 1}
    assert qr[:7, :7].sum() == 33  # a finder pattern: 7x7 ring + 3x3 core
    assert load_bitmap("qr", "DPG").tolist() == qr.tolist()


def test_qr_bitmap_decodes_back():
    assert decode_qr(qr_bitmap("DPG") == 1) == "DPG"
    assert decode_qr(np.zeros((21, 21), dtype=bool)) is None


def test_images_from_files(tmp_path):
    np.save(tmp_path / "pm.npy", np.array([[1, -1], [-1, 1]]))
    assert load_bitmap(str(tmp_path / "pm.npy")).tolist() == [[1, 0], [0, 1]]
    Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).save(tmp_path / "bw.png")
    assert load_bitmap(str(tmp_path / "bw.png")).tolist() == [[1, 0, 1]]


def test_bad_images_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not fit in the LM head"):
        LMHeadPattern(image="67", row_offset=8).setup(HeadOnly(vocab=12, hidden=9))
    with pytest.raises(ValueError, match="does not fit in the LM head"):
        LMHeadPattern(image="qr", qr_text="x").setup(HeadOnly(vocab=30, hidden=20))
    np.save(tmp_path / "gray.npy", np.array([[0.0, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="0/1 or -1/\\+1"):
        LMHeadPattern(image=str(tmp_path / "gray.npy"))
    Image.fromarray(np.array([[0, 128]], dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="not binary"):
        LMHeadPattern(image=str(tmp_path / "gray.png"))
    with pytest.raises(FileNotFoundError, match="neither"):
        LMHeadPattern(image="nope.png")
    with pytest.raises(ValueError, match="version-1"):
        qr_bitmap("x" * 40)
    with pytest.raises(ValueError, match="empty"):
        LMHeadPattern(image="qr", qr_text="")


# ------------------------------------------------------------------ likelihoods


def test_uuid_objective_equals_mean_token_loss(tiny):
    model, tok = tiny
    obj = SequenceLikelihood(DEFAULT_UUID)
    obj.bind_tokenizer(tok)
    data = tokenize_examples([DEFAULT_UUID], tok, 128)
    with torch.no_grad():
        logits = model(data.input_ids, attention_mask=data.attention_mask).logits
        expected = per_example_loss(logits, data.labels)[0]
        value = obj(model)
    assert value.item() == pytest.approx(-expected.item(), rel=1e-5)
    out = obj.readout(model)
    assert out["sequence_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["greedy_exact"] == 0.0 and 0.0 <= out["greedy_token_match"] <= 1.0
    check_metric(obj, model, [n for n, _ in model.named_parameters()])


def test_uuid_several_contexts_and_errors(tiny):
    model, tok = tiny
    obj = SequenceLikelihood("ab", contexts=["x", "yy"])
    obj.bind_tokenizer(tok)
    ids, labels = obj.batch.input_ids, obj.batch.labels
    scored = [tok.convert_ids_to_tokens(row[row != -100].tolist()) for row in labels]
    assert scored == [["a", "b", "</s>"], ["a", "b", "</s>"]]
    assert ids[0, 0] == tok.eos_token_id  # start token (no bos in the byte tokenizer)
    with pytest.raises(RuntimeError, match="bind_tokenizer"):
        SequenceLikelihood("ab")(model)
    with pytest.raises(ValueError, match="empty"):
        SequenceLikelihood("  ")


def test_greedy_readout_detects_a_memorised_uuid(tiny):
    _, tok = tiny
    model = build_model(ModelConfig(seed=3), len(tok))
    pretrain(model, tok, ["0123"], steps=60, lr=1e-2, batch_size=1)
    obj = SequenceLikelihood("0123")
    obj.bind_tokenizer(tok)
    assert obj.readout(model)["greedy_exact"] == 1.0


def test_last_word_objective_scores_only_the_last_word(tiny, tmp_path):
    model, tok = tiny
    file = tmp_path / "held.txt"
    file.write_text("el gato duerme\n\nla casa blanca\n")
    obj = LastWordLikelihood(str(file))
    obj.bind_tokenizer(tok)
    labels = obj.batch.labels
    scored = ["".join(tok.convert_ids_to_tokens(r[r != -100].tolist())) for r in labels]
    assert scored == [" duerme</s>", " blanca</s>"]
    assert obj.readout(model)["last_word_loss"] == pytest.approx(-obj(model).item())
    assert last_word_split("a b c") == ("a b", " c")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        LastWordLikelihood(str(empty))


def test_pretrain_lowers_the_loss(tiny):
    _, tok = tiny
    model = build_model(ModelConfig(seed=4), len(tok))
    model.requires_grad_(False)
    texts = read_texts(str(ROOT / "configs/tiny/data/es.txt"))
    losses = pretrain(model, tok, texts, steps=30, lr=3e-3, batch_size=8)
    assert losses[-1] < losses[0] - 1.0
    assert not any(p.requires_grad for p in model.parameters())  # flags restored


# ------------------------------------------------------------------ user metrics


def test_function_objective_from_an_import_path(tiny):
    model, _ = tiny
    obj = FunctionMetric("examples.my_metric.my_metric")
    assert isinstance(obj, Metric)
    value = check_metric(obj, model, ["transformer.wte.weight"])
    expected = -model.get_output_embeddings().weight[51:61].pow(2).mean().item()
    assert value == pytest.approx(expected)
    assert set(obj.readout(model)) == {"digit_rows_rms"}
    assert FunctionMetric("examples.my_metric:my_metric").fn is obj.fn


def test_function_objective_errors(tiny):
    model, _ = tiny
    with pytest.raises(ImportError, match="cannot import module"):
        FunctionMetric("no_such_pkg.metric")
    with pytest.raises(ImportError, match="has no"):
        FunctionMetric("examples.my_metric.missing")
    with pytest.raises(ValueError, match="not an import path"):
        FunctionMetric("metric")
    with pytest.raises(ValueError, match="scalar"):
        bad = FunctionMetric("examples.my_metric.bad_metric")
        check_metric(bad, model, ["transformer.wte.weight"])


# ------------------------------------------------------------------ configs

CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_config_parses(path, monkeypatch):
    """``fit --config X --print_config`` parses every key and class path without building models."""
    from dpg_lightning.cli import main

    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(path), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["metric"]["class_path"]


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.parent.name == "tiny"], ids=lambda p: p.stem
)
def test_tiny_config_metrics_instantiate(path, tiny, monkeypatch):
    """Each tiny config's metric builds, binds the tokenizer and checks on the tiny target."""
    monkeypatch.chdir(ROOT)
    cfg = yaml.safe_load(path.read_text())["model"]
    spec = cfg["metric"]
    module, _, name = spec["class_path"].rpartition(".")
    metric = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    model, tok = tiny
    metric.bind_tokenizer(tok)
    metric.setup(model)
    params = [n for n, _ in model.named_parameters()]
    assert math.isfinite(check_metric(metric, model, params))
