"""Any user metric from YAML: a plain function ``def my_metric(target) -> Tensor`` by import path.

LightningCLI instantiates ``model.metric`` from a ``class_path``, which must name a class. A user
who just wants to write a function points the YAML at :class:`FunctionMetric` instead::

    metric:
      class_path: dpg_lightning.metrics.user_metric.FunctionMetric
      init_args:
        fn: examples.my_metric.my_metric      # "package.module.function" or "module:function"

A user *class* (subclass of :class:`~dpg_lightning.metrics.base.Metric`, or any callable class)
needs no wrapper: give its own ``class_path``. Either way, a path that does not import fails at
start-up with the reason, and :func:`~dpg_lightning.metrics.base.check_metric` then checks that
the metric returns a finite scalar with a gradient path to the trained target parameters.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import Tensor, nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.metrics.base import Metric


def import_callable(path: str) -> Callable:
    """Import ``package.module.name`` or ``package.module:name`` and return that callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"metric function {path!r} is not an import path; write 'package.module.function' "
            "or 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"metric function {path!r}: cannot import module {module_name!r} ({err}); run from "
            "the directory that holds it or put it on PYTHONPATH"
        ) from err
    try:
        fn = getattr(module, attr)
    except AttributeError as err:
        raise ImportError(
            f"metric function {path!r}: module {module_name!r} has no {attr!r}"
        ) from err
    if not callable(fn):
        raise TypeError(f"metric function {path!r} is a {type(fn).__name__}, not a callable")
    return fn


class FunctionMetric(Metric):
    """Wrap a user function ``fn(target) -> scalar Tensor`` (higher is better) as an objective.

    Args:
        fn: import path of the function.
        kwargs: extra keyword arguments passed to every call (e.g. a weight or a row range).

    If the function's module also defines ``<name>_readout(target) -> dict[str, float]``, it is
    used as the readout; otherwise the readout is the metric value itself.
    """

    def __init__(self, fn: str, kwargs: dict | None = None) -> None:
        self.path = fn
        self.fn = import_callable(fn)
        if inspect.isclass(self.fn):
            raise TypeError(
                f"{fn!r} is a class: give it directly as `metric.class_path` instead of wrapping it"
            )
        self.kwargs = dict(kwargs or {})
        module = importlib.import_module(self.fn.__module__)
        self.readout_fn = getattr(module, f"{self.fn.__name__}_readout", None)
        self.__name__ = fn

    def __call__(self, target: nn.Module) -> Tensor:
        value = self.fn(target, **self.kwargs)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"`metric` {self.path} returned {shape}; it must return a scalar tensor "
                "(reduce it, e.g. with .mean())", "metric",
            )
        return value.reshape(())

    def readout(self, target: nn.Module) -> dict[str, float]:
        if self.readout_fn is not None:
            return {k: float(v) for k, v in self.readout_fn(target).items()}
        return {self.fn.__name__: float(self(target).detach())}
