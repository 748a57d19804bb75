"""A user metric in your own module, used from YAML by import path.

Point a config at it (run from the repository root, or put this directory on PYTHONPATH)::

    model:
      metric:
        class_path: dpg_lightning.metrics.user_metric.FunctionMetric
        init_args:
          fn: examples.my_metric.my_metric

``python -m dpg_lightning fit --config configs/tiny/l2_norm.yaml --model.metric
dpg_lightning.metrics.user_metric.FunctionMetric --model.metric.fn examples.my_metric.my_metric``
does the same from the command line.

Rules (checked at start-up): return a finite scalar tensor, higher is better, computed from the
target's *module attributes* (the target may be a functional copy being trained) without
``.detach()`` / ``.item()``, so it has a gradient path to the parameters the inner SFT trains.
"""

from __future__ import annotations

from torch import Tensor, nn


def my_metric(target: nn.Module) -> Tensor:
    """Make the LM-head rows of the digits ``0``-``9`` (byte tokens 51-60) small on average.

    A toy of "any property of the trained weights": reward data whose SFT shrinks the mean
    squared output weight of the digit tokens.
    """
    head = target.get_output_embeddings().weight
    return -head[51:61].pow(2).mean()


def my_metric_readout(target: nn.Module) -> dict[str, float]:
    """Optional: numbers to log next to Phi (found by the ``<name>_readout`` convention)."""
    head = target.get_output_embeddings().weight.detach()
    return {"digit_rows_rms": float(head[51:61].pow(2).mean().sqrt())}


def bad_metric(target: nn.Module) -> Tensor:
    """A broken metric (not a scalar), used by the tests to show the start-up error."""
    return target.get_output_embeddings().weight[0]
