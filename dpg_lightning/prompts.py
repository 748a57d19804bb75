"""Prompts for the generator: where they come from and the endless, resumable stream of them.

Training batches are ``num_prompts`` prompts per rank drawn with a seeded generator (an
infinite stream: a DPG run is measured in steps, not epochs). Global batch ``t`` is a pure
function of ``(seed, t)``, so nothing but ``t`` needs checkpointing and resuming continues
with exactly the prompts the uninterrupted run would have drawn. With several ranks, global
batch ``t`` has ``num_prompts x world_size`` prompts and rank ``r`` takes the ``r``-th share, so
the ranks' prompts together are one draw. No Lightning here: the data module
(:mod:`dpg_lightning.data`) serves this stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from dpg_lightning.errors import check_int_at_least
from dpg_lightning.seeds import derive_seed
from dpg_lightning.textfiles import read_lines


def read_prompts(path: str, key: str = "data.prompt_file") -> list[str]:
    """Prompts, one per line (a literal ``\\n`` inside a prompt stands for a newline)."""
    return [line.replace("\\n", "\n") for line in read_lines(path, key, "prompt")]


def load_prompts(
    prompt_file: str, num_prompts: int = 8, val_num_prompts: int = 16, seed: int = 0
) -> list[str]:
    """Check the data settings (``data.*``, the data module's arguments) and read the prompts.

    One function for the data module and for the CLI's check before anything is built.
    """
    check_int_at_least("data.num_prompts", num_prompts, 1)
    check_int_at_least("data.val_num_prompts", val_num_prompts, 1)
    check_int_at_least("data.seed", seed, 0)
    return read_prompts(prompt_file)


class PromptStream(IterableDataset):
    """Endless batches of ``batch_size`` prompts sampled with replacement, resumable.

    Batch ``t`` is drawn by a generator seeded with ``(seed, t)`` alone, so the stream can start
    at any ``start`` without replaying earlier draws. ``rank``/``world_size`` select this rank's
    share of global batch ``t`` (``batch_size x world_size`` prompts).
    """

    def __init__(
        self,
        prompts: list[str],
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def batch(self, t: int) -> list[str]:
        """This rank's prompts of global batch ``t``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", t))
        idx = torch.randint(len(self.prompts), (self.batch_size * self.world_size,), generator=gen)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine.tolist()]

    def __iter__(self) -> Iterator[list[str]]:
        t = self.start
        while True:
            yield self.batch(t)
            t += 1


def prompts_digest(prompts: list[str]) -> str:
    """A short hash of the prompts, so a resume can tell that they are the same."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
