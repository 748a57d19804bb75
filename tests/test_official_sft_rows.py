"""The SFT rows of the paper's code, token by token (issue 23, points 1-3).

The official inner SFT forms an example from ``tokenizer.encode(text)`` (bos prepended for
Llama, nothing for GPT-2): inputs are those tokens, labels the next ones with ``-100`` after the
last (``custom_metagrad_reward.compute_score``); ``create_batch_dataset(do_tokenize=False)``
pads both with token 0 (its default ``pad_token_id``: the metagrad server passes none for the
synthetic set) and cuts them to ``sequence_length``, then turns the ``-100`` into eos; the loss
masks ``labels != pad_token_id`` with the trainer's pad token, eos (``setup_training`` sets
``pad_token = eos_token``), runs the model without an attention mask, and takes the mean over
the ``sequence_length`` positions (``compute_weighted_loss``). :func:`official_rows` restates
that recipe; the tests hold the project's rows against it, and check the metagradients of the
new options against finite differences of the real SFT.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpg_lightning.data.tokenization import (
    OFFICIAL_PAD_ID,
    TokenRows,
    pad_rows,
    start_token_id,
    tokenize_examples,
)
from dpg_lightning.inner import (
    InnerConfig,
    RankOrder,
    inner_order,
    metagradient_rewards,
    per_example_loss,
)
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import OPTIMS, TEXTS, finite_difference_rewards, tiny

LONG = "the quick brown fox jumps"  # longer than the small max_length below: truncated


class BosTokenizer:
    """The test tokenizer with a bos token and eos as its pad token, as Llama 3.2's in the
    paper's code (whose ``encode`` prepends ``<|begin_of_text|>``)."""

    bos_token_id, eos_token_id = 2, 1
    pad_token_id = eos_token_id

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        ids = self.inner(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [[self.bos_token_id, *row] for row in ids] if add_special_tokens
                else ids}

    def __len__(self) -> int:
        return len(self.inner)


def official_rows(tokens: list[list[int]], length: int, eos: int, pad_id: int = OFFICIAL_PAD_ID):
    """Inputs, labels and loss mask ``[N, length]`` of the paper's inner SFT, from each example's
    ``encode`` output (``pad_id = eos``: the padding its target-metric loader uses)."""
    xs, ys = [], []
    for t in tokens:
        x, y = list(t), [*t[1:], -100]
        x = (x + [pad_id] * length)[:length]
        y = (y + [pad_id] * length)[:length]
        xs.append(x)
        ys.append([eos if v == -100 else v for v in y])
    x, y = torch.tensor(xs), torch.tensor(ys)
    return x, y, y != eos


def official_loss(model, x, y, keep, length: int) -> torch.Tensor:
    """Per-example official loss: masked token cross-entropy, summed over ``length``."""
    logits = model(x).logits  # no attention mask: every position attended, causally
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return (ce * keep).sum(1) / length


def project_loss(model, data: TokenRows, length: int) -> torch.Tensor:
    logits = model(data.input_ids, attention_mask=data.attention_mask).logits
    return per_example_loss(logits, data.labels, per_token_of=length)


def test_paper_convention_scores_the_next_tokens_never_the_eos(tokenizer):
    """Point 1: inputs are the example's tokens, labels the next tokens, eos never a target."""
    a, b, c = tokenizer("abc", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    gpt2 = tokenize_examples(["abc"], tokenizer, 24, start_token=False, end_token_target=False)
    assert gpt2.input_ids[0].tolist() == [a, b, c, eos]
    assert gpt2.labels[0].tolist() == [-100, b, c, -100]  # a -> b, b -> c; c -> eos unscored
    bos_tok = BosTokenizer(tokenizer)
    llama = tokenize_examples(["abc"], bos_tok, 24, start_token=True, end_token_target=False)
    assert llama.input_ids[0].tolist() == [2, a, b, c, eos]
    assert llama.labels[0].tolist() == [-100, a, b, c, -100]  # bos -> a, a -> b, b -> c
    own = tokenize_examples(["abc"], tokenizer, 24)  # the project's default: eos a target
    start = start_token_id(tokenizer)
    assert own.input_ids[0].tolist() == [start, a, b, c, eos]
    assert own.labels[0].tolist() == [-100, a, b, c, eos]


def test_default_convention_rows_unchanged(tokenizer):
    """The default rows are bit-identical to the former recipe: ``<start> text[:L-2] <eos>``
    right-padded, every token but the first a label (so default rewards are unchanged)."""
    texts = [*TEXTS, LONG, ""]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    start, eos = start_token_id(tokenizer), tokenizer.eos_token_id
    rows = [[start, *r[: 12 - 2], eos] for r in ids]
    former = pad_rows(rows, [len(r) - 1 for r in rows], tokenizer.pad_token_id)
    now = tokenize_examples(texts, tokenizer, 12)
    for field in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(now, field), getattr(former, field)), field


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_official_truncation_and_padding_match_the_official_loss(style, tokenizer):
    """Points 2 and 3: with both options the per-example loss is the official one, padding
    positions ("predict token 0") included; with masked padding it is the official loss
    without them (what the official target-metric loader, which passes the pad id, computes)."""
    length = 8
    tok = BosTokenizer(tokenizer) if style == "llama" else tokenizer
    texts = ["abc", LONG, "a", "hello world!"]  # "hello world!" has 12 bytes: also cut
    encoded = tok(texts, add_special_tokens=style == "llama")["input_ids"]
    eos = tok.eos_token_id
    model = tiny(style)
    paper = dict(start_token=style == "llama", end_token_target=False, truncation="official")
    data = tokenize_examples(texts, tok, length, padding="official_token0", **paper)
    x, y, keep = official_rows(encoded, length, eos)
    assert torch.equal(data.input_ids[:, :length], x) and data.attention_mask.all()
    assert torch.equal(data.labels[:, 1:], torch.where(keep, y, -100))
    assert data.input_ids.shape[1] == length + 1
    torch.testing.assert_close(project_loss(model, data, length),
                               official_loss(model, x, y, keep, length), rtol=1e-12, atol=0)
    masked = tokenize_examples(texts, tok, length, **paper)
    x, y, keep = official_rows(encoded, length, eos, pad_id=eos)
    assert int((masked.labels != -100).sum()) == int(keep.sum())
    torch.testing.assert_close(project_loss(model, masked, length),
                               official_loss(model, x, y, keep, length), rtol=1e-12, atol=0)


def test_what_truncation_keeps(tokenizer):
    """``official`` scores ``max_length`` transitions of an over-long text; ``project``
    ``max_length - 2`` with the end token unscored (126 of 128 in the paper configs)."""
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    kw = dict(start_token=False, end_token_target=False)
    official = tokenize_examples([LONG], tokenizer, 6, truncation="official", **kw)
    project = tokenize_examples([LONG], tokenizer, 6, **kw)
    assert official.input_ids[0].tolist() == ids[:7]  # 6 inputs and the 6th's target
    assert official.labels[0].tolist() == [-100, *ids[1:7]]
    assert project.input_ids[0].tolist() == [*ids[:5], tokenizer.eos_token_id]
    assert project.labels[0].tolist() == [-100, *ids[1:5], -100]


def test_official_padding_scores_token_zero(tokenizer):
    a, b = tokenizer("ab", add_special_tokens=False)["input_ids"]
    rows = tokenize_examples(["ab", ""], tokenizer, 5, start_token=False, end_token_target=False,
                             truncation="official", padding="official_token0")
    assert rows.input_ids.tolist() == [[a, b, 0, 0, 0, 0], [0] * 6]
    # "ab": a -> b, b -> eos (unscored), then the padding: 0 -> 0 three times
    assert rows.labels.tolist() == [[-100, b, -100, 0, 0, 0], [-100, -100, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="padding"):
        tokenize_examples(["ab"], tokenizer, 5, padding="token0")


OFFICIAL_ROWS = dict(loss_normalization="max_length", micro_batch_reduction="sum_of_means",
                     end_token_target=False, truncation="official", padding="official_token0")


@pytest.mark.parametrize(("backend", "optim"),
                         [("higher", "sgd"), ("func", "adamw"), ("replay", "adamw")])
def test_official_rows_match_finite_differences(backend, optim, tokenizer):
    """Rewards under official truncation and padding are the exact derivative of that SFT;
    "a", which has no text target, now has an effect through its scored padding."""
    target = tiny("gpt2")
    cfg = InnerConfig(optim=OPTIMS[optim], batch_size=3, micro_batch_size=2, max_length=8,
                      backend=backend, start_token=False, **OFFICIAL_ROWS)
    data = cfg.tokenize([*TEXTS[:-1], LONG, "a"], tokenizer)
    order = inner_order(len(data), 3, True, 1)
    phi = LMHeadL2Norm()
    rewards = metagradient_rewards(target, data, phi, cfg, RankOrder(order)).rewards
    fd = finite_difference_rewards(target, data, phi, cfg, order)
    assert (fd != 0).all()
    assert ((rewards - fd).abs() / fd.abs()).max() < 1e-4


def test_official_rows_match_finite_differences_llama(tokenizer, float64_llama):
    target = tiny("llama")
    cfg = InnerConfig(optim=OPTIMS["adamw"], batch_size=3, max_length=8, start_token=True,
                      **OFFICIAL_ROWS)
    data = cfg.tokenize(["abc", LONG, "a", "zz top"], BosTokenizer(tokenizer))
    order = inner_order(len(data), 3, True, 2)
    phi = LMHeadL2Norm()
    rewards = metagradient_rewards(target, data, phi, cfg, RankOrder(order)).rewards
    fd = finite_difference_rewards(target, data, phi, cfg, order)
    assert (fd != 0).all()
    assert ((rewards - fd).abs() / fd.abs()).max() < 1e-4
