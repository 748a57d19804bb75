"""How text becomes the target's token rows: SFT examples and the texts an objective scores.

One format for both, so that "the loss of a text" means the same thing to the inner SFT that
trains on it and to an objective that measures it (a UUID's likelihood, a passage's last word):

    <start> context text <eos>        start = bos, else eos; right-padded with the pad token

``labels`` are -100 everywhere but on the scored tokens: ``text`` and the closing ``<eos>``. An
SFT example has an empty context, so every token of it is scored; the start token gives the
first text token a context.

An SFT example is a token sequence ``x = <start> text`` and its next tokens ``y = x[1:] <eos>``:
the target at ``x[i]`` is ``y[i]``. The row holds ``x`` followed by ``y``'s last token (never an
input that a scored position sees), and labels ``[-100, *y]``, so that ``labels[:, 1:]`` are the
targets of ``logits[:, :-1]``.

The paper's code forms SFT examples differently, and each difference is an option (of
:func:`tokenize_examples`, and of ``model.inner`` in the YAML): no start token for GPT-2 (the
first text token is then context only); the end token not a target (its pad token is eos, so the
loss mask drops it); ``truncation="official"`` (up to ``max_length`` inputs and their
``max_length`` next tokens, where the project keeps ``max_length`` tokens with the eos); and
``padding="official_token0"`` (inputs and labels padded with token 0 to ``max_length`` and
attended, every padding position scored as "predict token 0", as the official inner SFT does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenRows:
    """Right-padded token rows: ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a
    token is not scored), each ``[rows, width]``."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> TokenRows:
        tensors = (self.input_ids, self.attention_mask, self.labels)
        return TokenRows(*(t.to(device) for t in tensors))


def start_token_id(tokenizer) -> int:
    """The token every row starts with: bos when the tokenizer has one, else eos."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_rows(rows: list[list[int]], scored: list[int], pad_id: int) -> TokenRows:
    """Right-pad ``rows``; the last ``scored[i]`` tokens of row i are its labels."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, scored, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - n : len(row)] = ids[i, len(row) - n : len(row)]
    return TokenRows(ids, mask, labels)


#: ``truncation`` choices of :func:`tokenize_examples`.
TRUNCATIONS = ("project", "official")
#: ``padding`` choices of :func:`tokenize_examples`.
PADDINGS = ("masked", "official_token0")
#: The official inner SFT's padding token (``create_batch_dataset``'s default ``pad_token_id``).
OFFICIAL_PAD_ID = 0


def tokenize_examples(
    texts: list[str],
    tokenizer,
    max_length: int,
    start_token: bool = True,
    end_token_target: bool = True,
    truncation: str = "project",
    padding: str = "masked",
) -> TokenRows:
    """SFT examples ``<start> text <eos>``: inputs ``x = <start> text`` and their next tokens.

    ``start_token=False`` drops ``<start>`` (the first text token is then context only);
    ``end_token_target=False`` keeps ``<eos>`` a label position but never a target.

    ``truncation``: ``project`` cuts ``x`` to ``max_length - 1`` tokens, so that the row with
    its eos has ``max_length``; ``official`` keeps ``max_length`` inputs and their
    ``max_length`` next tokens (the paper's ``sequence_length``; an over-long text then loses
    its eos, and every one of the ``max_length`` transitions is a text token's).

    ``padding``: ``masked`` right-pads with the pad token, unattended and unscored;
    ``official_token0`` pads ``x`` and its targets with token 0 up to ``max_length``, attended
    and scored (the official loss mask is ``labels != eos``, which keeps token 0), so every
    row is ``max_length + 1`` wide and its padding is trained on as "predict token 0".
    """
    if truncation not in TRUNCATIONS or padding not in PADDINGS:
        raise ValueError(f"truncation {truncation!r} / padding {padding!r}: expected one of "
                         f"{TRUNCATIONS} / {PADDINGS}")
    eos = tokenizer.eos_token_id
    start = [start_token_id(tokenizer)] if start_token else []
    rows = []
    for text in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        x = [*start, *text]
        if truncation == "project":
            x = x[: max_length - 1]
        # y[i] is the target at x[i]; the eos (the target at x's last token) may be unscored
        y, scored = [*x[1:], eos], [True] * len(x) + [end_token_target]
        scored = scored[1:] if x else scored[-1:]
        if padding == "official_token0":  # pad x and y to max_length (y before truncating it)
            pads = [OFFICIAL_PAD_ID] * max_length
            x, y, scored = x + pads, y + pads, scored + [True] * max_length
        elif not x:  # no start token and no text: a lone eos, nothing to predict
            y, scored = [], []
        x, y, scored = x[:max_length], y[:max_length], scored[:max_length]
        row = [*x, y[-1]] if x else [eos]
        rows.append((row, [-100] + [t if s else -100 for t, s in zip(y, scored, strict=True)]))
    width = max(len(row) for row, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return TokenRows(ids, mask, labels)


def tokenize_scored(
    tokenizer,
    contexts: list[str],
    texts: list[str],
    max_length: int | None = None,
    score_end_token: bool = True,
) -> TokenRows:
    """Rows ``<start> context text <eos>`` scored on ``text <eos>`` (on ``text`` alone without
    ``score_end_token``).

    ``max_length`` keeps the *end* of an over-long context (the part next to the scored text);
    a text that alone does not fit is an error.
    """
    rows, scored = [], []
    for ctx, text in zip(contexts, texts, strict=True):
        ctx_ids, text_ids = encode(tokenizer, ctx), encode(tokenizer, text)
        if max_length is not None:
            room = max_length - 2 - len(text_ids)
            if room < 0:
                raise ValueError(
                    f"the scored text {text[:40]!r} has {len(text_ids)} tokens; it does not fit "
                    f"max_length {max_length}"
                )
            ctx_ids = ctx_ids[len(ctx_ids) - room :] if len(ctx_ids) > room else ctx_ids
        rows.append([start_token_id(tokenizer), *ctx_ids, *text_ids, tokenizer.eos_token_id])
        scored.append(len(text_ids) + 1)
    data = pad_rows(rows, scored, tokenizer.pad_token_id)
    if not score_end_token:  # the eos stays last in the row (context for nothing), unscored
        last = data.attention_mask.sum(1) - 1
        data.labels[torch.arange(len(rows)), last] = -100
    return data
