"""Objectives ``Phi(target)``: differentiable scalars of the trained target, higher is better.

An objective is any callable ``phi(target: nn.Module) -> Tensor`` (a scalar with a gradient path
to the target's trained parameters). Subclass :class:`Metric` for optional hooks: ``setup``
sees the *initial* target once (to remember reference weights), ``readout`` reports the
human-facing numbers, ``bind_tokenizer`` receives the target's tokenizer (before ``setup``) for
objectives defined on text. The target passed in may be a ``higher``-patched copy or a module under
``torch.func.functional_call``: read weights through module attributes (``target.lm_head.weight``,
``target.get_output_embeddings().weight``), never through a cached tensor of the trained model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.inner.metric import MetricOnTarget


class Metric:
    """Base class for metrics (see module docstring)."""

    def bind_tokenizer(self, tokenizer) -> None:
        """Called once with the *target's* tokenizer, before :meth:`setup` (default: nothing).

        Objectives defined on text (a UUID's loss, held-out passages) tokenize it here, exactly
        as the inner SFT tokenizes examples; weight-space objectives ignore it.
        """

    def setup(self, target: nn.Module) -> None:
        """Called once with the initial target before training (default: nothing)."""

    def __call__(self, target: nn.Module) -> Tensor:
        raise NotImplementedError

    def readout(self, target: nn.Module) -> dict[str, float]:
        """Task numbers to log besides Phi (default: none)."""
        return {}

    def readout_samples(self, texts: list[str]) -> dict[str, float]:
        """Task numbers about the generator's validation samples themselves (default: none),
        e.g. whether it writes the string the target is asked to emit."""
        return {}


def check_metric(phi, target: nn.Module, trainable: list[str]) -> float:
    """Fail fast unless ``phi`` is a finite scalar with a gradient path to trained parameters.

    Returns Phi of the initial target. Runs once at start-up, before any long work. A metric
    that cannot work is a mistake in the config, not a bug: the error is a
    :class:`~dpg_lightning.common.errors.ConfigError` naming ``metric`` (and
    ``inner.train_params`` where that is the fix), keys relative to the module's settings that
    its caller places with :meth:`~dpg_lightning.common.errors.ConfigError.at`, so the CLI
    prints one line and exits 2 instead of a traceback.
    """
    named = dict(target.named_parameters())
    params = {n: named[n].detach().requires_grad_() for n in trainable}
    with torch.enable_grad():
        value = torch.func.functional_call(
            MetricOnTarget(target, phi), {f"target.{n}": p for n, p in params.items()}, ()
        )
    name = getattr(phi, "__name__", type(phi).__name__)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ConfigError(
            f"`metric` ({name}) returned {shape}; it must return a scalar tensor "
            "(reduce it, e.g. with .mean())",
            "metric",
        )
    if not torch.isfinite(value):
        raise ConfigError(
            f"`metric` ({name}) is {value.item()} on the initial target; it must be finite",
            "metric",
        )
    grads = []
    if value.requires_grad:
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    if all(g is None for g in grads):
        raise ConfigError(
            f"`metric` ({name}) has no gradient path to the trained target parameters "
            f"({len(trainable)} selected by `inner.train_params`): it reads only frozen weights "
            "or detaches them. Train the parameters it reads (e.g. `inner.train_params: all`) "
            "and compute it from module attributes without .detach()/.item()",
            "metric", "inner.train_params",
        )
    return float(value.detach())
