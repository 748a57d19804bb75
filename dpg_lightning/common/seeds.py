"""Every seed a run derives from its base seed, in one place.

Each random stream of a run (the sampling RNG of a training step, the prompts of a batch, the
order of an inner SFT, the validation sample) is re-seeded from the base seed, the stream's
name and its counters alone, so that a resumed run draws exactly what the uninterrupted run
drew (no RNG state to checkpoint) and ranks never share samples. The mixing is numpy's
``SeedSequence`` (a hash designed for this), not hand-made arithmetic: seeds of different
streams or counters are independent, never shifted copies of each other.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Stream = Literal["sampling", "prompts", "inner_order", "validation"]
_STREAM_IDS: dict[str, int] = {"sampling": 1, "prompts": 2, "inner_order": 3, "validation": 4}


def derive_seed(seed: int, stream: Stream, *counters: int) -> int:
    """A 63-bit seed for ``stream`` at ``counters`` (e.g. step and rank) of a run seeded ``seed``.

    ``sampling`` (step, rank): the generator's sampling at a training step on a rank;
    ``prompts`` (batch index): a global prompt batch; ``inner_order`` (step): the shuffle of
    that step's inner SFT, the same on every rank; ``validation`` (): the validation sample,
    the same at every validation (common random numbers).
    """
    if seed < 0 or any(c < 0 for c in counters):
        raise ValueError(f"seeds and counters must be >= 0 (seed {seed}, counters {counters})")
    sequence = np.random.SeedSequence(seed, spawn_key=(_STREAM_IDS[stream], *counters))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))
