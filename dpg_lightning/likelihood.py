"""Objectives on the target's likelihood of text: emit a UUID, speak a new language.

Both tokenize their text with the *target's* tokenizer in :meth:`bind_tokenizer` (the module
hands it over before ``setup``) in the row format of the inner SFT
(:mod:`dpg_lightning.tokenization`), so "the loss of the UUID" means the same thing to the
objective and to the SFT that is trained to lower it.

- :class:`SequenceLikelihood`: ``Phi = -`` mean token loss on a given string (a UUID), after an
  empty context or each of several contexts. The generator's prompts never mention it: DPG has to
  find data whose SFT makes the target emit it. Readout: the loss, and whether greedy decoding
  reproduces the string exactly.
- :class:`LastWordLikelihood`: ``Phi = -`` loss on the *last word + eos* of held-out passages in
  the new language (the paper's LAMBADA-style last-word cross-entropy), so the objective asks for
  the language's knowledge rather than for copying its passages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg_lightning.objectives import Objective
from dpg_lightning.text_sources import read_lines
from dpg_lightning.tokenization import TokenRows, encode, start_token_id, tokenize_scored

#: The UUID of the tiny and paper configs (random, fixed so runs are comparable).
DEFAULT_UUID = "4f3c2a1e-9b7d-4e2f-8a6c-0d5e7b9c1f23"


def scored_token_loss(target: nn.Module, rows: TokenRows) -> Tensor:
    """Mean cross-entropy over all scored tokens of the rows (a differentiable scalar)."""
    rows = rows.to(target.get_input_embeddings().weight.device)
    logits = target(rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), rows.labels[:, 1:], ignore_index=-100)


def _read_lines(path: str, key: str) -> list[str]:
    return [line.strip() for line in read_lines(path, key)]


class _TextObjective(Objective):
    """Shared plumbing: a tokenized batch built at ``bind_tokenizer`` time."""

    batch: TokenRows | None = None

    def _batch(self) -> TokenRows:
        if self.batch is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the target tokenizer: call "
                "`metric.bind_tokenizer(target_tokenizer)` before using it (DPGModule does)"
            )
        return self.batch

    def loss(self, target: nn.Module) -> Tensor:
        """The scored-token loss of ``target`` (``Phi = -loss``)."""
        return scored_token_loss(target, self._batch())

    def __call__(self, target: nn.Module) -> Tensor:
        return -self.loss(target)


class SequenceLikelihood(_TextObjective):
    """``Phi = -`` mean token loss of the target on ``text`` (e.g. a UUID) after each context.

    Args:
        text: the string to emit; ``text_file`` (its first non-empty line) wins when given.
        text_file: file holding the string.
        contexts: contexts the text must follow (default: one empty context, i.e. the text right
            after the start token, as an SFT example would begin).
        max_length: tokens per scored row (long contexts keep their end).
        check_greedy: readout ``greedy_exact`` (greedy decoding reproduces the text after the
            first context); it costs one forward per token of the text.
    """

    def __init__(
        self,
        text: str = DEFAULT_UUID,
        text_file: str | None = None,
        contexts: list[str] | None = None,
        max_length: int = 128,
        check_greedy: bool = True,
    ) -> None:
        if text_file is not None:
            text = _read_lines(text_file, "metric.init_args.text_file")[0]
        if not text or not text.strip():
            raise ValueError("`metric.init_args.text` is empty; give the string to emit")
        self.text = text
        self.contexts = list(contexts) if contexts else [""]
        self.max_length, self.check_greedy = max_length, check_greedy
        self.tokenizer = None
        self.text_ids: list[int] = []

    def bind_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text_ids = encode(tokenizer, self.text)
        n = len(self.contexts)
        self.batch = tokenize_scored(tokenizer, self.contexts, [self.text] * n, self.max_length)

    @torch.no_grad()
    def greedy(self, target: nn.Module, context: str = "") -> list[int]:
        """Greedy continuation of ``<start> context`` for ``len(text) + 1`` tokens (no cache).

        A plain loop rather than ``generate``: the target here may be a functional/patched copy.
        """
        tok = self.tokenizer
        device = target.get_input_embeddings().weight.device
        ids = torch.tensor([[start_token_id(tok), *encode(tok, context)]], device=device)
        out: list[int] = []
        for _ in range(len(self.text_ids) + 1):
            nxt = int(target(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], 1)
        return out

    def readout(self, target: nn.Module) -> dict[str, float]:
        out = {"sequence_loss": float(self.loss(target).detach())}
        if self.check_greedy:
            decoded = self.greedy(target, self.contexts[0])
            expected = [*self.text_ids, self.tokenizer.eos_token_id]
            out["greedy_exact"] = float(decoded == expected)
            same = sum(a == b for a, b in zip(decoded, expected, strict=False))
            out["greedy_token_match"] = same / len(expected)
        return out


def last_word_split(passage: str) -> tuple[str, str]:
    """``(context, " last_word")``: the passage cut before its final whitespace-separated word."""
    head, _, last = passage.rstrip().rpartition(" ")
    if not head:
        raise ValueError(f"passage {passage[:40]!r} has a single word; it needs a context")
    return head, " " + last


class LastWordLikelihood(_TextObjective):
    """``Phi = -`` cross-entropy of the *final word + eos* of held-out passages (LAMBADA-style).

    Args:
        passages_file: held-out passages in the new language, one per line (never used for
            pretraining or prompts).
        max_passages: use the first N passages (the objective runs once per SFT).
        max_length: tokens per passage (long passages keep their end).
    """

    def __init__(self, passages_file: str, max_passages: int | None = None, max_length: int = 128):
        passages = _read_lines(passages_file, "metric.init_args.passages_file")
        self.passages = passages[:max_passages] if max_passages else passages
        self.split = [last_word_split(p) for p in self.passages]
        self.max_length = max_length

    def bind_tokenizer(self, tokenizer) -> None:
        contexts, words = zip(*self.split, strict=True)
        self.batch = tokenize_scored(tokenizer, list(contexts), list(words), self.max_length)

    def readout(self, target: nn.Module) -> dict[str, float]:
        return {"last_word_loss": float(self.loss(target).detach())}
