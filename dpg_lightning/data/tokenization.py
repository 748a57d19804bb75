"""How text becomes the target's token rows: SFT examples and the texts an objective scores.

One format for both, so that "the loss of a text" means the same thing to the inner SFT that
trains on it and to an objective that measures it (a UUID's likelihood, a passage's last word):

    <start> context text <eos>        start = bos, else eos; right-padded with the pad token

``labels`` are -100 everywhere but on the scored tokens: ``text`` and the closing ``<eos>``. An
SFT example has an empty context, so every token of it is scored; the start token gives the
first text token a context.

The paper's code forms SFT examples differently, and both differences are options: no start
token for GPT-2 (the first text token is then context only), and the end token not a target
(its pad token is eos, so the loss mask drops it).
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


def tokenize_examples(
    texts: list[str],
    tokenizer,
    max_length: int,
    start_token: bool = True,
    end_token_target: bool = True,
) -> TokenRows:
    """SFT examples ``<start> text <eos>``, each cut to fit ``max_length`` tokens.

    ``start_token=False`` drops ``<start>`` (the first text token is then context only);
    ``end_token_target=False`` keeps ``<eos>`` in the row but not among the scored tokens.
    """
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    start = [start_token_id(tokenizer)] if start_token else []
    rows = [[*start, *row[: max_length - 1 - len(start)], tokenizer.eos_token_id] for row in ids]
    # the first token of a row is never predicted; the last (eos) only when it is a target
    scored = [len(r) - 1 - (0 if end_token_target else 1) for r in rows]
    return pad_rows(rows, scored, tokenizer.pad_token_id)


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
