"""Rollout statistics of a DPG run, aggregated with torchmetrics over each logging window.

The module logs one value per training step (its own ``train/reward_mean``...). This callback
adds what a researcher watches to see whether the policy is learning or collapsing: the spread
and extremes of the rewards, how many examples help (positive reward), the advantage scale,
completion lengths and throughput. Values are aggregated over all steps since the last time
Lightning wrote logs (``trainer.log_every_n_steps``), so a large logging interval does not
silently drop the steps in between, and torchmetrics' ``compute`` syncs them across DDP ranks.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MinMetric, SumMetric

from dpg_lightning.dpg.step_output import StepOutput


class VarianceMetric(Metric):
    """Unbiased variance of all values seen (sums in float64, so it syncs across ranks).

    torchmetrics has mean/min/max aggregators but no standard deviation one.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_sq", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().double().flatten()
        self.total += values.sum()
        self.total_sq += (values * values).sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        if self.count < 2:  # nan when empty (nothing to report), 0 for a single value
            value = float("nan") if self.count == 0 else 0.0
            return torch.tensor(value, dtype=torch.float64, device=self.total.device)
        mean = self.total / self.count
        var = (self.total_sq - self.count * mean * mean) / (self.count - 1)
        return var.clamp(min=0)


def _stats(prefix: str) -> dict[str, Metric]:
    return {
        f"{prefix}_mean": MeanMetric(),
        f"{prefix}_var": VarianceMetric(),
        f"{prefix}_min": MinMetric(),
        f"{prefix}_max": MaxMetric(),
    }


class RolloutMetrics(L.Callback):
    """Log reward / advantage / completion statistics and examples per second.

    Logged keys (``prefix`` defaults to ``rollout/``): ``reward_{mean,std,min,max}``,
    ``reward_positive_share`` (share of examples whose up-weighting raises Phi),
    ``reward_nonfinite_share``, ``advantage_{mean,std,min,max}``, ``completion_chars`` (mean
    characters per completion), ``empty_share`` (share of empty completions: a collapse
    signal), and ``time/examples_per_second`` (examples of all ranks per second of this rank's
    training-step time, i.e. excluding validation).

    Args:
        prefix: key prefix, distinct from the module's per-step ``train/`` keys.
    """

    def __init__(self, prefix: str = "rollout/") -> None:
        super().__init__()
        self.prefix = prefix
        self.metrics = nn.ModuleDict(
            {
                **_stats("reward"),
                **_stats("advantage"),
                "reward_positive_share": MeanMetric(),
                "reward_nonfinite_share": MeanMetric(),
                "completion_chars": MeanMetric(),
                "empty_share": MeanMetric(),
                "examples": SumMetric(),
            }
        )
        self._seconds = 0.0
        self._batch_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Move the metric states to the device the module will train on.

        Callback metrics are not submodules of the LightningModule, so Lightning does not move
        them; and the module itself is still on the CPU during ``setup``, hence the strategy's
        root device (DDP's NCCL sync needs the states on the GPU).
        """
        self.metrics.to(trainer.strategy.root_device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._batch_start is not None:
            self._seconds += time.perf_counter() - self._batch_start
            self._batch_start = None
        step = StepOutput.of(outputs)
        if step is not None:
            self._update(step, trainer.strategy.root_device)
        # Compute only when Lightning writes this step's logs, so the window covers every step
        # since the previous write (logging every step would keep only the last one).
        if getattr(trainer._logger_connector, "should_update_logs", True):
            values = self.compute_and_reset()
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def _update(self, step: StepOutput, device: torch.device) -> None:
        m = self.metrics
        rewards = step.rewards.detach().to(device, torch.float64)
        finite = torch.isfinite(rewards)
        m["reward_nonfinite_share"].update((~finite).double())
        rewards = rewards[finite]
        if rewards.numel():
            for key in ("reward_mean", "reward_var", "reward_min", "reward_max"):
                m[key].update(rewards)
            m["reward_positive_share"].update((rewards > 0).double())
        advantages = step.advantages
        if advantages is not None and advantages.numel():
            advantages = advantages.detach().to(device, torch.float64)
            for key in ("advantage_mean", "advantage_var", "advantage_min", "advantage_max"):
                m[key].update(advantages)
        texts = step.texts
        if texts:
            lengths = torch.tensor([len(t) for t in texts], dtype=torch.float64, device=device)
            m["completion_chars"].update(lengths)
            m["empty_share"].update((lengths == 0).double())
        m["examples"].update(torch.tensor(float(step.rewards.numel())))

    def compute_and_reset(self) -> dict[str, float]:
        """The window's values (metrics that saw no data are left out), then a new window."""
        out: dict[str, float] = {}
        with warnings.catch_warnings():
            # Every metric is computed, even one this rank did not update in this window:
            # `compute` syncs across DDP ranks, and a rank skipping it would hang the others.
            # Empty windows come out nan (mean) or inf (min/max) and are left out.
            warnings.simplefilter("ignore")
            values = {key: float(metric.compute()) for key, metric in self.metrics.items()}
        for key, value in values.items():
            if not math.isfinite(value):
                continue
            if key.endswith("_var"):
                key, value = key[: -len("_var")] + "_std", value**0.5
            if key == "examples":
                if self._seconds > 0:
                    out["time/examples_per_second"] = value / self._seconds
                continue
            out[self.prefix + key] = value
        for metric in self.metrics.values():
            metric.reset()
        self._seconds = 0.0
        return out
