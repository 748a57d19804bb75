"""What a plan is computed from, and building it from a parsed config.

The planner reads the same config ``fit`` reads, as a plain dict (the shell parses it: the
parser names the Lightning module's arguments). The settings are built into the same config
dataclasses ``fit`` builds, so that their ``__post_init__`` checks fail here as they would
there, before anything is estimated; the models are replaced by their shapes
(:mod:`dpg_lightning.planning.shapes`), so no model is built and no file the config names
needs to exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpg_lightning.common.settings import build_settings
from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.dpg.rollout import SamplingConfig
from dpg_lightning.inner import InnerConfig
from dpg_lightning.models.build import ModelConfig
from dpg_lightning.planning.shapes import ModelShape, resolve_shape


@dataclass(frozen=True)
class PlanInputs:
    """Everything one step's numbers depend on: the settings, the models' shapes and the ranks.

    The knob search (:mod:`dpg_lightning.planning.search`) changes these with
    :func:`dataclasses.replace` and estimates again, so they hold no text and no machine.
    """

    gen: ModelShape
    target: ModelShape
    inner: InnerConfig
    sampling: SamplingConfig
    policy: PolicyConfig
    reward: str
    distributed: str
    sft_groups: str
    num_prompts: int
    gpus: int
    prompt_tokens: int
    gen_compute_bytes: int
    same_tokenizer: bool
    max_steps: int | None = None  # trainer.max_steps: DPG steps of the run, for its time

    @property
    def shared(self) -> bool:
        """One SFT over all ranks' rollouts (``distributed: shared`` on more than one rank)."""
        return self.distributed == "shared" and self.gpus > 1


@dataclass(frozen=True)
class ShapeSource:
    """How the printed plan names a model: its hub name (or ``built``) and where its shape
    came from."""

    label: str
    where: str


def _int(value: object) -> int | None:
    """An integer trainer setting: the YAML's int, or the string a ``--trainer.KEY`` override
    leaves in the trainer dict; ``None`` for anything else (``devices: auto``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def is_gpu_trainer(trainer: Mapping[str, Any] | None) -> bool:
    """Whether the config's trainer names a GPU accelerator: then its devices and nodes are
    the ranks, and the run is meant for a training node, not necessarily this machine."""
    return str((trainer or {}).get("accelerator", "auto")) in ("gpu", "cuda")


def trainer_ranks(trainer: Mapping[str, Any] | None) -> int:
    """Ranks of the run: ``devices x num_nodes`` on a GPU trainer, else 1."""
    trainer = trainer or {}
    devices, nodes = _int(trainer.get("devices", 1)), _int(trainer.get("num_nodes", 1))
    counted = devices is not None and nodes is not None
    return devices * nodes if is_gpu_trainer(trainer) and counted else 1


def inputs_from_config(
    config: Mapping[str, Any],
    *,
    gpus: int | None = None,
    prompt_tokens: int,
    generator_shape: str | None = None,
    target_shape: str | None = None,
) -> tuple[PlanInputs, dict[str, ShapeSource]]:
    """The plan's inputs from a parsed ``fit`` config (``model``, ``data``, ``trainer``), and
    how to name each model; ``gpus`` overrides the trainer's ranks, the shapes are
    ``key=value,...`` for models whose shape is not known otherwise."""
    m, trainer = config["model"], config.get("trainer") or {}
    gen_mc = build_settings(ModelConfig, m.get("generator"), at="model.generator")
    target_mc = build_settings(ModelConfig, m.get("target"), at="model.target", seed=1)
    gen, gen_where = resolve_shape(gen_mc, "model.generator", generator_shape)
    target, target_where = resolve_shape(target_mc, "model.target", target_shape)
    precision = str(trainer.get("precision", "32"))
    half = precision.startswith(("bf16", "16")) or gen_mc.dtype == "bfloat16"
    max_steps = _int(trainer.get("max_steps"))
    inputs = PlanInputs(
        gen=gen, target=target,
        inner=build_settings(InnerConfig, m.get("inner"), at="model.inner"),
        sampling=build_settings(SamplingConfig, m.get("sampling"), at="model.sampling"),
        policy=build_settings(PolicyConfig, m.get("policy"), at="model.policy"),
        reward=m["reward"], distributed=m["distributed"], sft_groups=m["sft_groups"],
        num_prompts=config["data"]["num_prompts"],
        gpus=trainer_ranks(trainer) if gpus is None else gpus, prompt_tokens=prompt_tokens,
        gen_compute_bytes=2 if half else gen.bytes_per_param,
        same_tokenizer=(gen_mc.tokenizer or gen_mc.pretrained)
        == (target_mc.tokenizer or target_mc.pretrained),
        max_steps=max_steps if max_steps and max_steps > 0 else None,
    )
    sources = {
        "generator": ShapeSource(gen_mc.pretrained or "built", gen_where),
        "target": ShapeSource(target_mc.pretrained or "built", target_where),
    }
    return inputs, sources
