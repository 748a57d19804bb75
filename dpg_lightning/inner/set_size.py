"""The synthetic set one inner SFT trains on, and the inner batch that set allows.

One rule, used wherever it matters: the module (at set-up and per SFT), the preflight check
(before any model is built) and the planner. An SFT covers this rank's rollouts, or all
ranks' with ``distributed: shared``; with ``sft_groups: inverse`` each SFT covers one
inverse group (the k-th sample of every prompt), so its batch is at most the group's size.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpg_lightning.common.errors import ConfigError


@dataclass(frozen=True)
class SFTSet:
    """The examples of one step's SFTs.

    Attributes:
        num_prompts: prompts per rank and step (``data.num_prompts``).
        samples_per_prompt: completions per prompt (``model.sampling.samples_per_prompt``).
        ranks: ranks whose examples one SFT covers (the world size when shared, else 1).
        inverse_groups: one SFT per inverse group instead of one over the whole set.
    """

    num_prompts: int
    samples_per_prompt: int
    ranks: int = 1
    inverse_groups: bool = False

    @property
    def per_rank(self) -> int:
        """This rank's rollouts of a step (all SFTs together)."""
        return self.num_prompts * self.samples_per_prompt

    @property
    def size(self) -> int:
        """Examples in one SFT (all ranks' when shared; one group's with inverse groups)."""
        per_sft = self.num_prompts if self.inverse_groups else self.per_rank
        return per_sft * self.ranks

    @property
    def count(self) -> int:
        """SFTs per step."""
        return self.samples_per_prompt if self.inverse_groups else 1

    def batch(self, batch_size: int) -> int:
        """The inner batch one SFT uses. A whole-set SFT needs ``1 <= batch_size <= size``; an
        inverse group's batch is capped at the group's size (the groups are a fixed split of
        the set, so a batch sized for the whole set still runs, one step per group)."""
        limit = self.per_rank * self.ranks
        if not 1 <= batch_size <= limit:
            what = "num_prompts x samples_per_prompt" + (" x ranks" if self.ranks > 1 else "")
            raise ConfigError(
                f"`inner.batch_size` is {batch_size} but the synthetic set of a step has "
                f"{limit} examples (data.{what}): choose 1 <= inner.batch_size <= {limit}",
                "inner.batch_size",
            )
        return min(batch_size, self.size)
