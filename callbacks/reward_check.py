"""Check during fit that DPG's rewards still track the exact leave-one-out effects.

Whether ``r_i = dPhi/deps_i`` tracks ``Phi(D) - Phi(D with eps_i = 0)`` depends on the inner
settings *and* on what the generator writes, which training changes: a check of the initial
generator (``python -m dpg_lightning check-rewards``) says nothing about step 500. This callback
runs the same check (:func:`dpg_lightning.check_rewards.check_step_rewards`) every
``every_n_validations`` validations and logs its statistics like any metric:
``val/reward_loo_pearson``, ``val/reward_loo_spearman``, ``val/reward_loo_sign_agreement``,
``val/reward_loo_rel_error``.

The set checked is the one the *next* training step samples (its prompts, its sampling seed,
its inner order), so the rewards are the ones that step will use. It costs one reward
computation and ``num_examples + 2`` plain SFTs in float64 per check, on global rank zero only
(a single-rank SFT, no collectives; the other ranks wait at the next step's synchronisation).
Each check's arrays are also written to ``<run dir>/reward_check/step<N>.json`` (and ``.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.files import run_dir, writes_files
from dpg_lightning.check_rewards import (
    RewardCheckResult,
    check_step_rewards,
    sample_step_set,
    step_prompts,
    write_outputs,
)
from dpg_lightning.common.errors import ConfigError


class RewardCheck(L.Callback):
    """Log the agreement of a step's rewards with exact leave-one-out, every N validations.

    Args:
        every_n_validations: check at every N-th validation of fit (1: every one).
        num_examples: K, the examples whose leave-one-out is computed (one plain SFT each);
            at most the step's set size (``data.num_prompts x samples_per_prompt``).
        variant: ``zero_weight`` (``eps_i = 0``, what ``r_i`` linearises) or ``remove``.
        write_files: also write each check's JSON and scatter plot into the run directory.
    """

    def __init__(self, every_n_validations: int = 1, num_examples: int = 16,
                 variant: str = "zero_weight", write_files: bool = True) -> None:
        super().__init__()
        if every_n_validations < 1:
            raise ConfigError(f"RewardCheck(every_n_validations={every_n_validations}): "
                              "use >= 1")
        if variant not in ("zero_weight", "remove"):
            raise ConfigError(f"RewardCheck(variant={variant!r}): use zero_weight or remove")
        self.every_n_validations, self.num_examples = every_n_validations, num_examples
        self.variant, self.write_files = variant, write_files
        self.validations = 0
        self.directory: Path | None = None
        self.last: RewardCheckResult | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a K the step's set cannot hold now, not at the first validation."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "prompts"):
            raise ConfigError("RewardCheck needs the run's PromptDataModule (data.*)")
        size = dm.num_prompts * pl_module.sampling.samples_per_prompt
        if not 2 <= self.num_examples <= size:
            raise ConfigError(
                f"RewardCheck(num_examples={self.num_examples}) must be between 2 and the "
                f"step's set size {size} (data.num_prompts x model.sampling.samples_per_prompt)"
            )
        directory = run_dir(trainer) / "reward_check"  # a collective: every rank asks
        if self.write_files and writes_files(trainer, stage):
            self.directory = directory

    def state_dict(self) -> dict[str, Any]:
        """The validations counted so far: a resumed run keeps the same schedule."""
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        dm, step = trainer.datamodule, trainer.global_step
        prompts = step_prompts(dm.prompts, dm.num_prompts, dm.seed, step,
                               trainer.global_rank, trainer.world_size)
        with trainer.precision_plugin.forward_context():  # the generator samples as in training
            texts = sample_step_set(pl_module, prompts, step, trainer.global_rank)
        result = check_step_rewards(pl_module, texts, step, self.num_examples, self.variant)
        self.last = result
        pl_module.log_dict(result.metrics(), rank_zero_only=True, batch_size=len(prompts))
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_outputs(self.directory / f"step{step}.json", pl_module, result,
                          {"step": step})
