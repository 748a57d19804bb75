"""The generator trains with fp32 master weights and bf16 compute (``trainer.precision:
bf16-mixed``), while the inner SFT keeps the precision ``inner.autocast`` gives it.

Why it matters: the paper's actor learning rates are 5e-6 and 1e-6. A bf16 weight has 8 bits
of mantissa, so an AdamW step of 1e-6 on weights of size ~0.02 rounds away on nearly every
weight; fp32 master weights keep it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

import dpg_lightning.dpg.step as dpg_step
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.dpg.rollout import SamplingConfig
from dpg_lightning.inner import InnerConfig
from dpg_lightning.models.build import ModelConfig
from dpg_lightning.module import DPGModule

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _one_step(tmp_path, generator_dtype: str, precision: str, monkeypatch) -> tuple[float, dict]:
    """Share of the generator weights with a gradient that one AdamW step at lr 1e-6 changes,
    and what the step saw."""
    seen: dict[str, object] = {}
    original = dpg_step.metagradient_rewards

    def spy(target, data, *args, **kwargs):
        seen["inner_autocast"] = torch.is_autocast_enabled("cpu")
        out = original(target, data, *args, **kwargs)
        seen["reward_dtype"] = out.rewards.dtype
        return out

    monkeypatch.setattr(dpg_step, "metagradient_rewards", spy)
    module = DPGModule(
        generator=ModelConfig(**TINY, dtype=generator_dtype, init_std=0.02),
        target=ModelConfig(**TINY, seed=1, init_std=0.2),
        inner=InnerConfig(batch_size=2, max_length=16),
        sampling=SamplingConfig(samples_per_prompt=2, max_new_tokens=8),
        policy=PolicyConfig(lr=1e-6, max_grad_norm=None, baseline="batch_mean",
                            scale_rewards="batch"),
    )
    def record(mod, args, out) -> None:  # a forward hook must return None
        if torch.is_grad_enabled():
            seen.setdefault("generator_logits", out.logits.dtype)

    hook = module.generator.register_forward_hook(record)
    before = [p.detach().clone().float() for p in module.generator.parameters()]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nsay something\nabc\n")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False, check_val_every_n_epoch=None, val_check_interval=1000,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=PromptDataModule(str(prompts), num_prompts=2, seed=0))
    hook.remove()
    # Among the weights the step had a gradient for (embeddings of tokens that never occur
    # have none, and without weight decay AdamW leaves them as they are).
    state = trainer.optimizers[0].state
    changed = moved = 0
    for p, old in zip(module.generator.parameters(), before):
        had_grad = state[p]["exp_avg"] != 0
        changed += int(((p.detach().float() != old) & had_grad).sum())
        moved += int(had_grad.sum())
    return changed / moved, seen


def test_fp32_master_weights_keep_a_small_update(tmp_path, monkeypatch):
    share, seen = _one_step(tmp_path, "float32", "bf16-mixed", monkeypatch)
    assert share > 0.9, share
    assert seen["generator_logits"] == torch.bfloat16  # the policy update computed in bf16
    assert seen["inner_autocast"] is False  # the inner SFT is not under the trainer's autocast
    assert seen["reward_dtype"] == torch.float32


@pytest.mark.slow
def test_pure_bf16_weights_lose_most_of_the_update(tmp_path, monkeypatch):
    """The failure mode the fp32 master weights fix (kept as a measured contrast)."""
    share, _ = _one_step(tmp_path, "bfloat16", "32-true", monkeypatch)
    assert share < 0.5, share
