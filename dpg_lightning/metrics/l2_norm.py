"""``Phi = -||W_lmhead||_F``: the LM-head norm, the paper's simplest target (and the demo's)."""

from __future__ import annotations

from torch import Tensor, nn

from dpg_lightning.metrics.base import Metric


def lm_head_weight(target: nn.Module) -> Tensor:
    """The LM-head matrix ``[vocab, hidden]`` (tied heads are the input embedding)."""
    head = target.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(target).__name__} has no output embeddings (LM head)")
    return head.weight


class LMHeadL2Norm(Metric):
    """``Phi = -||W_lmhead||_F``: reward data whose SFT shrinks the LM head."""

    def __call__(self, target: nn.Module) -> Tensor:
        return -lm_head_weight(target).norm()

    def readout(self, target: nn.Module) -> dict[str, float]:
        return {"lm_head_norm": float(lm_head_weight(target).detach().norm())}
