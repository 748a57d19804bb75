"""The Lightning data module: serves the prompt stream and remembers how far it has got.

Validation uses a fixed list of prompts so every validation compares the generator on the
same prompts. Reading and checking the prompt sources is :mod:`dpg_lightning.data.prompts`' job (no
Lightning there); this module is only the glue. It counts the training batches consumed and
saves that count in the checkpoint (Lightning stores a datamodule's ``state_dict``); with the
stream of :mod:`dpg_lightning.data.prompts` a pure function of the batch index, a resume continues
exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.data.prompts import TEXT, PromptStream, load_prompts, prompts_digest


class PromptDataModule(L.LightningDataModule):
    """Serves prompt batches and remembers how far the training stream has got.

    Args:
        prompt_file: where the training prompts come from: a ``.txt`` file (one prompt per
            line, a literal ``\\n`` is a newline), a ``.jsonl`` or ``.parquet`` file, or a
            Hugging Face ``datasets`` hub name (``org/name``; needs hub access or its cache).
        num_prompts: prompts per training step and rank (each gets ``samples_per_prompt``
            completions).
        val_num_prompts: prompts in the fixed validation set (the first prompts of the
            validation source, cycled if it is shorter).
        seed: seed of the training prompt order.
        prompt_field: the JSONL field / parquet column / dataset column holding the prompt.
        prompt_split: the split of a hub dataset (slices such as ``train[:10000]`` work).
        prompt_config: the configuration (subset) of a hub dataset that has several, e.g.
            ``20231101.en`` for ``wikimedia/wikipedia``.
        prompt_template: wraps each prompt; ``{text}`` marks where it goes, e.g.
            ``"Rephrase this article: {text}"``.
        val_prompt_file: a separate validation source (same field, config and template);
            ``None`` validates on the first prompts of ``prompt_file``.
        val_prompt_split: the split of a hub ``val_prompt_file`` (``None``: ``prompt_split``).
    """

    def __init__(
        self,
        prompt_file: str,
        num_prompts: int = 8,
        val_num_prompts: int = 16,
        seed: int = 0,
        prompt_field: str = "text",
        prompt_split: str = "train",
        prompt_config: str | None = None,
        prompt_template: str = TEXT,
        val_prompt_file: str | None = None,
        val_prompt_split: str | None = None,
    ) -> None:
        super().__init__()
        sets = load_prompts(
            prompt_file, num_prompts, val_num_prompts, seed, prompt_field=prompt_field,
            prompt_split=prompt_split, prompt_config=prompt_config,
            prompt_template=prompt_template, val_prompt_file=val_prompt_file,
            val_prompt_split=val_prompt_split,
        )
        self.prompts, self.val_prompts = sets.train, sets.val
        self.num_prompts, self.val_num_prompts, self.seed = num_prompts, val_num_prompts, seed
        # Training batches handed to the model so far (counted in `on_before_batch_transfer`,
        # which runs once per batch actually trained on; the loader itself may prefetch).
        self.batches_consumed = 0

    def train_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = PromptStream(
            self.prompts, self.num_prompts, self.seed, self.batches_consumed, rank, world
        )
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.val_prompts], batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they reach the model (not validation batches)."""
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Stream position plus what defines the stream, so a resume can check it is the same."""
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "num_prompts": self.num_prompts,
            "prompts_sha256": prompts_digest(self.prompts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream where the checkpoint left it; refuse a different stream.

        A different seed or prompt file would silently turn a resume into another experiment,
        so those are errors; ``num_prompts`` may change (e.g. resuming on more GPUs) with a
        warning, since the stream then continues at the same step but is no longer the same.
        """
        for key, mine in (("seed", self.seed), ("prompts_sha256", prompts_digest(self.prompts))):
            theirs = state_dict.get(key, mine)
            if theirs != mine:
                what = "data.seed" if key == "seed" else (
                    "training prompts (data.prompt_file, prompt_field, prompt_template...)"
                )
                raise ConfigError(
                    f"the checkpoint comes from a run with different {what} ({theirs!r}, this "
                    f"run: {mine!r}), so it cannot be resumed exactly; resume with the config "
                    "it was trained with, or start a fresh run (no --ckpt_path, new run dir)"
                )
        if state_dict.get("num_prompts", self.num_prompts) != self.num_prompts:
            warnings.warn(
                f"resuming with data.num_prompts={self.num_prompts} but the checkpoint used "
                f"{state_dict['num_prompts']}: the prompt stream continues but differs from "
                "the original run's",
                stacklevel=2,
            )
        self.batches_consumed = int(state_dict["batches_consumed"])
