"""Lightning callbacks that observe a DPG run (``dpg_lightning`` never imports this package).

Add them to a config's ``trainer.callbacks`` list, e.g. ``class_path: callbacks.SampleWriter``.
"""

from callbacks.hparams import StructuredHparams
from callbacks.metrics import RolloutMetrics, VarianceMetric
from callbacks.plots import LMHeadPatchImage, PhiCurvePlot
from callbacks.reward_check import RewardCheck
from callbacks.samples import SampleWriter

__all__ = [
    "LMHeadPatchImage",
    "PhiCurvePlot",
    "RewardCheck",
    "RolloutMetrics",
    "SampleWriter",
    "StructuredHparams",
    "VarianceMetric",
]
