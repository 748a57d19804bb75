"""The metric as the inner SFT sees it: any ``metric(target) -> scalar tensor``.

The inner backends only call the metric; what a metric is (hooks, readouts, the shipped ones)
lives in :mod:`dpg_lightning.metrics`, which builds on this package and never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

#: ``Phi = metric(target)``: a differentiable scalar of the trained target, higher is better.
MetricFn = Callable[[nn.Module], Tensor]


class MetricOnTarget(nn.Module):
    """Wraps ``metric(target)`` as a module so ``torch.func.functional_call`` can swap in
    weights (the target is a submodule, so its parameters are addressed ``target.<name>``)."""

    def __init__(self, target: nn.Module, metric: MetricFn) -> None:
        super().__init__()
        self.target = target
        self.metric = metric

    def forward(self) -> Tensor:
        return self.metric(self.target)
