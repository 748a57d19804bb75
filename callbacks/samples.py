"""The best- and worst-rewarded examples of each step, as JSONL and as a W&B table.

Reading the examples that DPG rewards most and least is the quickest way to see what the
generator is being pushed towards (and to spot reward hacking); aggregate numbers hide that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from callbacks.files import drop_rows_from, run_dir, writes_files
from dpg_lightning.dpg.step_output import StepOutput

COLUMNS = ["step", "rank", "prompt", "text", "reward", "advantage"]


def _number(value: float | None) -> float | None:
    """JSON has no NaN/inf: write them as null rather than produce an unparsable line."""
    return value if value is not None and math.isfinite(value) else None


def select_rows(output: StepOutput, step: int, top_k: int, bottom_k: int) -> list[dict]:
    """Rows of the ``top_k`` highest- then ``bottom_k`` lowest-rewarded examples (disjoint).

    ``rank`` is ``top1..`` / ``bottom1..`` (``bottom1`` is the lowest). Non-finite rewards rank
    below every finite one among the top rows and are never bottom rows.
    """
    rewards = [float(r) for r in output.rewards.tolist()]
    advantages = output.advantages
    advantages = advantages.tolist() if advantages is not None else [None] * len(rewards)
    finite = [i for i, r in enumerate(rewards) if math.isfinite(r)]
    order = sorted(finite, key=lambda i: rewards[i], reverse=True)
    order += sorted(set(range(len(rewards))) - set(finite))
    top = order[:top_k]
    rest = [i for i in reversed(order[len(top):]) if math.isfinite(rewards[i])]
    bottom = rest[:bottom_k]
    picks = [(f"top{n + 1}", i) for n, i in enumerate(top)]
    picks += [(f"bottom{n + 1}", i) for n, i in enumerate(bottom)]
    return [
        {
            "step": step,
            "rank": rank,
            "prompt": output.prompts[i],
            "text": output.texts[i],
            "reward": _number(rewards[i]),
            "advantage": _number(None if advantages[i] is None else float(advantages[i])),
        }
        for rank, i in picks
    ]


class SampleWriter(L.Callback):
    """Append each step's top-k / bottom-k rewarded examples to ``<run dir>/<filename>``.

    Rows: ``{"step", "rank", "prompt", "text", "reward", "advantage"}``. With a
    ``WandbLogger`` the rows so far (the last ``max_table_rows``) are also logged as the
    ``wandb.Table`` ``samples`` every ``table_every_n_steps`` steps and at the end: W&B tables
    are immutable, so each log shows the cumulative history rather than one step.

    Only global rank zero writes, and it writes its own rank's examples (gathering strings
    across ranks would cost a collective per step for a diagnostic).

    Args:
        top_k: highest-rewarded examples per step.
        bottom_k: lowest-rewarded examples per step.
        filename: JSONL file name inside the run directory.
        every_n_steps: write every N training steps.
        table_every_n_steps: log the W&B table every N steps (and at the end).
        max_table_rows: rows kept for the W&B table.
    """

    def __init__(
        self,
        top_k: int = 4,
        bottom_k: int = 4,
        filename: str = "samples.jsonl",
        every_n_steps: int = 1,
        table_every_n_steps: int = 20,
        max_table_rows: int = 1000,
    ) -> None:
        super().__init__()
        if top_k < 0 or bottom_k < 0 or every_n_steps < 1 or table_every_n_steps < 1:
            raise ValueError("top_k/bottom_k must be >= 0 and every_n_steps values >= 1")
        self.top_k, self.bottom_k, self.filename = top_k, bottom_k, filename
        self.every_n_steps, self.table_every_n_steps = every_n_steps, table_every_n_steps
        self.max_table_rows = max_table_rows
        self.output_path: Path | None = None
        self._rows: list[dict] = []
        self._table_step = -1
        self._step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        directory = run_dir(trainer)  # every rank must ask; only rank zero writes
        if writes_files(trainer, stage):
            directory.mkdir(parents=True, exist_ok=True)
            self.output_path = directory / self.filename

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run continues the file: rows of steps it redoes (after the
        ``trainer.global_step`` steps its checkpoint holds) are dropped, and the W&B table
        starts from the rows already written."""
        if self.output_path is None:
            return
        drop_rows_from(self.output_path, trainer.global_step + 1)
        if self.output_path.is_file():
            rows = [json.loads(line) for line in self.output_path.read_text().splitlines()]
            self._rows = rows[-self.max_table_rows :]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Rows carry the DPG step they belong to (1 for the first), the step under which the
        # module logs this batch's `train/*` values and checkpoint names count it.
        self._step = trainer.global_step + 1

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        output = StepOutput.of(outputs)
        if self.output_path is None or output is None:
            return
        step = self._step
        if step % self.every_n_steps:
            return
        rows = select_rows(output, step, self.top_k, self.bottom_k)
        with self.output_path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self._rows = (self._rows + rows)[-self.max_table_rows :]
        if step % self.table_every_n_steps == 0:
            self._log_table(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output_path is not None:
            self._log_table(trainer)

    def _log_table(self, trainer: L.Trainer) -> None:
        if not self._rows or self._table_step == trainer.global_step:
            return
        self._table_step = trainer.global_step
        data = [[row[c] for c in COLUMNS] for row in self._rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("samples", columns=COLUMNS, data=data, step=trainer.global_step)
