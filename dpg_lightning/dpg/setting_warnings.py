"""Settings that run but learn little or nothing: each config is valid on its own, so these
are warnings, not errors."""

from __future__ import annotations

from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.dpg.rollout import SamplingConfig
from dpg_lightning.models.build import ModelConfig


def setting_warnings(
    sampling: SamplingConfig, policy: PolicyConfig, generator: ModelConfig
) -> list[str]:
    """What to warn about in these settings (empty when nothing)."""
    out = []
    if generator.dtype == "bfloat16":
        out.append(
            "`model.generator.dtype: bfloat16` trains the generator's weights in bf16: an AdamW "
            f"step of lr {policy.lr:g} rounds away on most of them (tests/test_precision.py). "
            "Use `model.generator.dtype: float32` with `trainer.precision: bf16-mixed` (fp32 "
            "master weights, bf16 compute)"
        )
    if policy.baseline == "group" and sampling.samples_per_prompt == 1:
        out.append(
            "`policy.baseline: group` with `sampling.samples_per_prompt: 1` gives every example "
            "zero advantage (nothing to compare within a group): nothing will be learned. "
            "Raise samples_per_prompt or use baseline: batch_mean | leave_one_out"
        )
    return out
