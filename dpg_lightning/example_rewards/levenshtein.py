"""The paper's Levenshtein baseline: minus the mean token edit distance to the target-metric set.

Official definition (``reward_fn_levenshtein`` in the paper's ``custom_metagrad_reward.py``):
``r_i = -(1/M) sum_j Levenshtein.distance(ids_i, ref_ids_j)`` over the M passages of the set,
on token ids of the *target's* tokenizer (the server's ``tokenizer_name``; in the paper's runs
generator and target are both Llama-3.2-1B-Instruct). The example's ids are its decoded text
re-encoded as ``tokenizer.encode(text)``: ``[bos] + text`` for Llama; a passage's are
``[bos] + context + " last_word" + [eos]`` (the eos appended for Llama-3.2 only). No other
normalisation: the reward is a negative count of edits, in tokens. Each example is scored on
its own, so scoring per inverse group (the paper's ``cross_group_batching: false``) or per step
gives the same rewards.

Here the same: the texts are re-encoded with the target tokenizer bound at start-up, and the
start/end tokens are options whose defaults are the paper's Llama setting. The edit distance is
``rapidfuzz``'s (the paper's ``Levenshtein`` package is a wrapper of it) on the id sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpg_lightning.data.tokenization import encode, start_token_id
from dpg_lightning.example_rewards.base import ExampleReward


class TokenLevenshtein(ExampleReward):
    """``r_i = -`` mean Levenshtein distance between example i's token ids and each passage's.

    Args:
        start_token: prepend the start token (bos, else eos) to examples and passages, as the
            paper's Llama tokenizer does (false for a tokenizer without bos, e.g. GPT-2's).
        reference_end_token: append eos to each passage (the paper's Llama-3.2 setting).
        workers: threads for the distance matrix (``-1``: all cores; rapidfuzz's ``workers``).
    """

    def __init__(self, start_token: bool = True, reference_end_token: bool = True,
                 workers: int = 1) -> None:
        self.start_token, self.reference_end_token = start_token, reference_end_token
        self.workers = workers
        self.tokenizer: Any = None
        self.reference_ids: list[list[int]] = []

    def _ids(self, text: str) -> list[int]:
        start = [start_token_id(self.tokenizer)] if self.start_token else []
        return [*start, *encode(self.tokenizer, text)]

    def bind(self, tokenizer: Any, reference_texts: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        end = [tokenizer.eos_token_id] if self.reference_end_token else []
        self.reference_ids = [[*self._ids(t), *end] for t in reference_texts]

    def __call__(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts: Sequence[str]
    ) -> list[float]:
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        if not self.reference_ids:
            raise RuntimeError("TokenLevenshtein needs `bind(tokenizer, reference_texts)` first")
        distances = cdist([self._ids(t) for t in texts], self.reference_ids,
                          scorer=Levenshtein.distance, workers=self.workers)
        return (-distances.mean(axis=1)).tolist()
