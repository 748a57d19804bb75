"""Every seed a run derives from its base seed, in one place.

Each random stream of a run (the sampling RNG of a training step, the prompts of a batch, the
order of an inner SFT, the validation sample) is re-seeded from the base seed and the stream's
counters alone, so that a resumed run draws exactly what the uninterrupted run drew (no RNG
state to checkpoint) and ranks never share samples.
"""

from __future__ import annotations


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the sampling RNG for training step ``step`` on ``rank``."""
    return (seed * 1_000_003 + step * 10_007 + rank * 7_919 + 17) % (2**63 - 1)


def prompt_batch_seed(seed: int, t: int) -> int:
    """Seed of global prompt batch ``t`` (independent of how many batches came before)."""
    return (seed * 1_000_003 + t * 7_919 + 1) % (2**63 - 1)


def inner_order_seed(seed: int, step: int) -> int:
    """Seed of the inner SFT's shuffle at training step ``step`` (the same on every rank)."""
    return seed * 1_000_003 + step


def validation_seed(seed: int) -> int:
    """Seed of the validation sample (the same at every validation: common random numbers)."""
    return seed + 12345
