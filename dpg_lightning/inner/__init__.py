"""The inner SFT of the target on a synthetic set, plain or differentiable, and its attribution.

Everything here is plain functions of modules and tensors (no Lightning), so the metagradient
can be checked against finite differences of the very same SFT.

- :mod:`~dpg_lightning.inner.config`: ``InnerConfig`` / ``ReplayConfig`` (``model.inner``).
- :mod:`~dpg_lightning.inner.steps`: one inner step: its batch order, loss, trained parameters.
- :mod:`~dpg_lightning.inner.optim`: differentiable SGD / Adam / AdamW and the update's VJP.
- :mod:`~dpg_lightning.inner.sft`: one SFT (plain or differentiable), and SFT on raw texts.
- :mod:`~dpg_lightning.inner.unrolled`: the ``higher`` and ``func`` backends (whole SFT on
  the tape; :mod:`~dpg_lightning.inner.higher_compat` makes ``higher`` correct).
- :mod:`~dpg_lightning.inner.replay` (+ :mod:`~dpg_lightning.inner.replay_storage`): the
  ``replay`` backend, memory flat in the inner steps.
- :mod:`~dpg_lightning.inner.attribution`: rewards ``dPhi/deps_i`` (or the dataset reward),
  dispatched to the backend, all returning an
  :class:`~dpg_lightning.inner.attribution_result.Attribution`.
- :mod:`~dpg_lightning.inner.shared_sft`: one SFT as a rank runs it (``RankOrder``), shared by
  all ranks or not; :mod:`~dpg_lightning.inner.set_size`: a step's set and the batch it allows.
"""

from dpg_lightning.inner.attribution import dataset_reward, metagradient_rewards
from dpg_lightning.inner.attribution_result import Attribute, Attribution
from dpg_lightning.inner.config import InnerConfig, ReplayConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.inner.set_size import SFTSet
from dpg_lightning.inner.sft import run_sft, sft_on_texts
from dpg_lightning.inner.shared_sft import RankOrder, rank_order
from dpg_lightning.inner.steps import inner_order, per_example_loss, step_loss, trainable_names
from dpg_lightning.inner.unrolled import GradReduce

__all__ = [
    "Attribute",
    "Attribution",
    "GradReduce",
    "InnerConfig",
    "InnerOptimConfig",
    "MetricFn",
    "RankOrder",
    "ReplayConfig",
    "SFTSet",
    "dataset_reward",
    "inner_order",
    "metagradient_rewards",
    "per_example_loss",
    "rank_order",
    "run_sft",
    "sft_on_texts",
    "step_loss",
    "trainable_names",
]
