"""Objectives on the target's likelihood of text: emit a UUID, speak a new language.

Both tokenize their text with the *target's* tokenizer in :meth:`bind_tokenizer` (the module
hands it over before ``setup``) in the row format of the inner SFT
(:mod:`dpg_lightning.data.tokenization`), so "the loss of the UUID" means the same thing to the
objective and to the SFT that is trained to lower it.

- :class:`SequenceLikelihood`: ``Phi = -`` mean token loss on a given string (a UUID), after an
  empty context or each of several contexts. The generator's prompts never mention it: DPG has to
  find data whose SFT makes the target emit it. Readouts: the loss, whether greedy decoding
  reproduces the string exactly, and how much of it the *generator's* samples contain.
- :class:`LastWordLikelihood`: ``Phi = -`` loss on the *last word (+ eos)* of held-out passages
  in the new language (the paper's LAMBADA-style last-word cross-entropy), so the objective asks
  for the language's knowledge rather than for copying its passages.

Both read their text from a string, a local file, or a dataset (the paper's are hub datasets:
``Tristan/uuid_dataset``, ``Tristan/lambada_openai_custom_splits``), falling back to a local
copy where the hub is out of reach. The paper's conventions are options: the end token not
scored, and the language loss per passage summed over its tokens and divided by 128.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg_lightning.common.errors import check_choice
from dpg_lightning.data.text_sources import SourceKeys, read_entries_with_fallback
from dpg_lightning.data.tokenization import TokenRows, encode, start_token_id, tokenize_scored
from dpg_lightning.inner.steps import per_example_loss
from dpg_lightning.metrics.base import Metric

#: The UUID of the tiny and paper configs (random, fixed so runs are comparable).
DEFAULT_UUID = "4f3c2a1e-9b7d-4e2f-8a6c-0d5e7b9c1f23"


def scored_token_loss(
    target: nn.Module, rows: TokenRows, per_token_of: int | None = None
) -> Tensor:
    """Cross-entropy of the scored tokens (a differentiable scalar): the mean over all of them,
    or with ``per_token_of = L`` each row's sum over ``L``, averaged over rows (the paper's)."""
    rows = rows.to(target.get_input_embeddings().weight.device)
    logits = target(rows.input_ids, attention_mask=rows.attention_mask).logits.float()
    if per_token_of is not None:
        return per_example_loss(logits, rows.labels, per_token_of).mean()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), rows.labels[:, 1:], ignore_index=-100)


def _keys(prefix: str) -> SourceKeys:
    key = f"model.metric.init_args.{prefix}"
    return SourceKeys(f"{key}_source", f"{key}_field", f"{key}_split", f"{key}_config")


def longest_prefix_in(text: str, sample: str) -> int:
    """Characters of the longest prefix of ``text`` that occurs somewhere in ``sample``."""
    low, high = 0, len(text)  # a prefix that occurs implies all shorter ones do: bisect
    while low < high:
        mid = (low + high + 1) // 2
        if text[:mid] in sample:
            low = mid
        else:
            high = mid - 1
    return low


class _TextObjective(Metric):
    """Shared plumbing: a tokenized batch built at ``bind_tokenizer`` time."""

    batch: TokenRows | None = None

    def _batch(self) -> TokenRows:
        if self.batch is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the target tokenizer: call "
                "`metric.bind_tokenizer(target_tokenizer)` before using it (DPGModule does)"
            )
        return self.batch

    per_token_of: int | None = None

    def loss(self, target: nn.Module) -> Tensor:
        """The scored-token loss of ``target`` (``Phi = -loss``)."""
        return scored_token_loss(target, self._batch(), self.per_token_of)

    def __call__(self, target: nn.Module) -> Tensor:
        return -self.loss(target)


class SequenceLikelihood(_TextObjective):
    """``Phi = -`` mean token loss of the target on ``text`` (e.g. a UUID) after each context.

    Args:
        text: the string to emit (unless a source below gives it).
        text_source: a dataset or file whose first entry is the string (a hub name such as
            the paper's ``Tristan/uuid_dataset``, or a .txt/.jsonl/.parquet file).
        text_file: a local file whose first entry is the string: used when ``text_source`` is
            unset, or is a hub dataset that cannot be loaded from here.
        text_field, text_split: the field/column and (hub) split of the source.
        contexts: contexts the text must follow (default: one empty context, i.e. the text right
            after the start token, as an SFT example would begin).
        max_length: tokens per scored row (long contexts keep their end).
        check_greedy: readout ``greedy_exact`` (greedy decoding reproduces the text after the
            first context); it costs one forward per token of the text.
        score_end_token: the end token after the text is scored too (default); the paper
            scores ``[BOS] + UUID`` without it.
    """

    def __init__(
        self,
        text: str = DEFAULT_UUID,
        text_file: str | None = None,
        contexts: list[str] | None = None,
        max_length: int = 128,
        check_greedy: bool = True,
        text_source: str | None = None,
        text_field: str = "text",
        text_split: str = "train",
        score_end_token: bool = True,
    ) -> None:
        if text_source is not None or text_file is not None:
            text = read_entries_with_fallback(
                text_source, text_file, text_field, text_split, None, _keys("text"),
                "model.metric.init_args.text_file",
            )[0].strip()
        if not text or not text.strip():
            raise ValueError("`metric.init_args.text` is empty; give the string to emit")
        self.text = text
        self.contexts = list(contexts) if contexts else [""]
        self.max_length, self.check_greedy = max_length, check_greedy
        self.score_end_token = score_end_token
        self.tokenizer = None
        self.text_ids: list[int] = []

    def reference_texts(self) -> list[str]:
        """The string to emit: the set a per-example reward compares examples with."""
        return [self.text]

    def bind_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text_ids = encode(tokenizer, self.text)
        n = len(self.contexts)
        self.batch = tokenize_scored(tokenizer, self.contexts, [self.text] * n, self.max_length,
                                     self.score_end_token)

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
            if not self.score_end_token:  # the text alone, whatever follows it
                decoded, expected = decoded[: len(self.text_ids)], self.text_ids
            out["greedy_exact"] = float(decoded == expected)
            same = sum(a == b for a, b in zip(decoded, expected, strict=False))
            out["greedy_token_match"] = same / len(expected)
        return out


    def readout_samples(self, texts: list[str]) -> dict[str, float]:
        """How much of the text the generator's samples contain: the share that contain it
        whole, and the mean length of the longest prefix of it found in a sample, as a share
        of its length (the paper's claim is that the *generator* learns to write it)."""
        if not texts:
            return {}
        prefixes = [longest_prefix_in(self.text, t) / len(self.text) for t in texts]
        return {
            "text_emitted_share": sum(self.text in t for t in texts) / len(texts),
            "text_prefix_share": sum(prefixes) / len(prefixes),
        }


def last_word_split(passage: str) -> tuple[str, str]:
    """``(context, " last_word")``: the passage cut before its final whitespace-separated word."""
    head, _, last = passage.rstrip().rpartition(" ")
    if not head:
        raise ValueError(f"passage {passage[:40]!r} has a single word; it needs a context")
    return head, " " + last


class LastWordLikelihood(_TextObjective):
    """``Phi = -`` cross-entropy of the *final word + eos* of held-out passages (LAMBADA-style).

    Args:
        passages_file: held-out passages in the new language, a local file (one per line, or
            .jsonl/.parquet with ``passages_field``), never used for pretraining or prompts;
            used when ``passages_source`` is unset or cannot be loaded from here.
        max_passages: use the first N passages (the objective runs once per SFT).
        max_length: tokens per passage (long passages keep their end).
        passages_source: a dataset or file of passages, e.g. the paper's
            ``Tristan/lambada_openai_custom_splits`` with ``passages_config: es`` (or fr, de, it).
        passages_config, passages_split, passages_field: its configuration, split and column.
        score_end_token: score the end token after the last word too (default); the paper
            scores the last word's tokens only.
        loss_normalization: ``token_mean`` over all scored tokens (default), or the paper's
            ``max_length``: each passage's summed cross-entropy over ``max_length``, averaged.
    """

    def __init__(
        self,
        passages_file: str | None = None,
        max_passages: int | None = None,
        max_length: int = 128,
        passages_source: str | None = None,
        passages_config: str | None = None,
        passages_split: str = "train",
        passages_field: str = "text",
        score_end_token: bool = True,
        loss_normalization: Literal["token_mean", "max_length"] = "token_mean",
    ):
        check_choice("model.metric.init_args.loss_normalization", loss_normalization,
                     ("token_mean", "max_length"))
        passages = read_entries_with_fallback(
            passages_source, passages_file, passages_field, passages_split, passages_config,
            _keys("passages"), "model.metric.init_args.passages_file",
        )
        passages = [p.strip() for p in passages]
        self.passages = passages[:max_passages] if max_passages else passages
        self.split = [last_word_split(p) for p in self.passages]
        self.max_length, self.score_end_token = max_length, score_end_token
        self.per_token_of = max_length if loss_normalization == "max_length" else None

    def reference_texts(self) -> list[str]:
        """The held-out passages, whole: the set a per-example reward compares examples with
        (``dpg_lightning.example_rewards``)."""
        return list(self.passages)

    def bind_tokenizer(self, tokenizer) -> None:
        contexts, words = zip(*self.split, strict=True)
        self.batch = tokenize_scored(tokenizer, list(contexts), list(words), self.max_length,
                                     self.score_end_token)

    def readout(self, target: nn.Module) -> dict[str, float]:
        return {"last_word_loss": float(self.loss(target).detach())}
