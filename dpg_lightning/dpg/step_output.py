"""What one DPG training step hands to the callbacks that observe it.

Lightning passes a manual-optimization step's return value to ``on_train_batch_end`` only as
a mapping, so the step returns ``{"step": StepOutput(...)}`` and observers read it with
:meth:`StepOutput.of`, never by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

_KEY = "step"


@dataclass(frozen=True)
class StepOutput:
    """One step's examples, on this rank, prompt-major (the samples of prompt 0 come first).

    Attributes:
        texts: the completions (the synthetic examples).
        prompts: the prompt of each completion.
        rewards: each example's reward (CPU).
        advantages: each example's advantage (CPU); ``None`` when the policy update was skipped.
    """

    texts: list[str]
    prompts: list[str]
    rewards: Tensor
    advantages: Tensor | None = None

    def as_lightning_output(self) -> dict[str, StepOutput]:
        """The mapping ``training_step`` returns (Lightning requires one)."""
        return {_KEY: self}

    @staticmethod
    def of(outputs: Any) -> StepOutput | None:
        """The step's output from what Lightning passes to ``on_train_batch_end`` (``None``
        when the step produced none, e.g. another module's step)."""
        if isinstance(outputs, Mapping) and isinstance(outputs.get(_KEY), StepOutput):
            return outputs[_KEY]
        return None
