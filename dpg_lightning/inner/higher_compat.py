"""Make ``higher`` 0.2.1 (the last release, 2020) correct on today's torch and transformers.

Two fixes, each covered by a test:

* **Adam/AdamW.** 0.2.1's ``DifferentiableAdam`` predates the upstream fix for its discrepancy
  with ``torch.optim.Adam`` (facebookresearch/higher#72, never released): its metagradients
  were seen ~20% off finite differences; and ``torch.optim.AdamW`` is rejected outright. We
  register our own differentiable Adam, AdamW (and SGD, for one code path) with
  ``higher.register_optim``; all use :func:`dpg_lightning.inner.optim.optimizer_step`.
* **Slicing patched ``nn.ModuleList``.** Llama-family forwards run
  ``for layer in self.layers[: n]``; ``ModuleList.__getitem__(slice)`` rebuilds the list with
  ``self.__class__(...)``, which for higher's patched class has another signature and raises
  ``MonkeyPatched.__init__() missing ... 'root'``. :func:`patch_module_lists` swaps each
  patched list's class for a subclass whose slices are plain ``nn.ModuleList`` views of the
  same (patched) layers.
"""

from __future__ import annotations

import higher
import torch
from torch import nn

from dpg_lightning.inner.optim import InnerOptimConfig, OptimState, init_state, optimizer_step


class _DifferentiableTorchOptim(higher.optim.DifferentiableOptimizer):
    """A ``higher`` optimizer updating with :func:`optimizer_step` (one ``torch.optim`` type)."""

    name: str = "sgd"

    def _update(self, grouped_grads, **kwargs) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            cfg = InnerOptimConfig(
                name=self.name,
                lr=group["lr"],
                betas=tuple(group.get("betas", (0.9, 0.999))),
                eps=group.get("eps", 1e-8),
                eps_root=group.get("eps_root", 0.0),
                weight_decay=group.get("weight_decay", 0.0),
                momentum=group.get("momentum", 0.0),
            )
            params = group["params"]
            slot = self.state[group_idx]
            if "functional" not in slot:
                slot["functional"] = init_state(params, cfg)
            state: OptimState = slot["functional"]
            group["params"], slot["functional"] = optimizer_step(params, grads, state, cfg)


class DifferentiableSGD(_DifferentiableTorchOptim):
    name = "sgd"


class DifferentiableAdam(_DifferentiableTorchOptim):
    name = "adam"


class DifferentiableAdamW(_DifferentiableTorchOptim):
    name = "adamw"


def register() -> None:
    """Route ``torch.optim.SGD/Adam/AdamW`` in ``higher`` to our differentiable optimizers."""
    higher.register_optim(torch.optim.SGD, DifferentiableSGD)
    higher.register_optim(torch.optim.Adam, DifferentiableAdam)
    higher.register_optim(torch.optim.AdamW, DifferentiableAdamW)


_SLICE_SAFE: dict[type, type] = {}


def _slice_safe(cls: type) -> type:
    if cls not in _SLICE_SAFE:

        def __getitem__(self, idx):
            if isinstance(idx, slice):
                return nn.ModuleList(list(self._modules.values())[idx])
            return cls.__getitem__(self, idx)

        _SLICE_SAFE[cls] = type(cls.__name__, (cls,), {"__getitem__": __getitem__})
    return _SLICE_SAFE[cls]


def patch_module_lists(fmodel: nn.Module) -> nn.Module:
    """Let every ``nn.ModuleList`` inside a higher-patched model be sliced (see module doc)."""
    for module in fmodel.modules():
        if isinstance(module, nn.ModuleList) and type(module) not in _SLICE_SAFE.values():
            module.__class__ = _slice_safe(type(module))
    return fmodel
