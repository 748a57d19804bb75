"""Prompts for the generator: a text file, one prompt per line.

Training batches are ``num_prompts`` prompts drawn with a seeded generator (an infinite stream:
a DPG run is measured in steps, not epochs). Validation uses a fixed slice of prompts so every
validation compares the generator on the same prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


def read_prompts(path: str, key: str = "data.prompt_file") -> list[str]:
    """Non-empty lines of ``path`` (``\\n`` inside a prompt may be written as a literal ``\\n``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"`{key}: {path}` does not exist (relative paths start at {Path.cwd()}); "
            "point it at a text file with one prompt per line"
        )
    prompts = [line.replace("\\n", "\n") for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"`{key}: {path}` has no prompts; write one prompt per line")
    return prompts


class PromptStream(IterableDataset):
    """Endless batches of ``batch_size`` prompts sampled with replacement, seeded."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int) -> None:
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed

    def __iter__(self) -> Iterator[list[str]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            idx = torch.randint(len(self.prompts), (self.batch_size,), generator=gen)
            yield [self.prompts[i] for i in idx.tolist()]


class PromptDataModule(L.LightningDataModule):
    """Serves prompt batches.

    Args:
        prompt_file: text file, one prompt per line.
        num_prompts: prompts per training step (each gets ``samples_per_prompt`` completions).
        val_num_prompts: prompts in the fixed validation set (the first lines of the file,
            cycled if the file is shorter).
        seed: seed of the training prompt order.
    """

    def __init__(
        self, prompt_file: str, num_prompts: int = 8, val_num_prompts: int = 16, seed: int = 0
    ) -> None:
        super().__init__()
        for key, value in (("num_prompts", num_prompts), ("val_num_prompts", val_num_prompts)):
            if value < 1:
                raise ValueError(f"`data.{key}` is {value}; it must be at least 1")
        self.prompts = read_prompts(prompt_file)
        self.num_prompts, self.val_num_prompts, self.seed = num_prompts, val_num_prompts, seed

    def train_dataloader(self) -> DataLoader:
        stream = PromptStream(self.prompts, self.num_prompts, self.seed)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        val = [self.prompts[i % len(self.prompts)] for i in range(self.val_num_prompts)]
        return DataLoader([val], batch_size=None)
