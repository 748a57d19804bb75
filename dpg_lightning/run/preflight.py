"""Checks of a parsed run config that need this machine but no model, run before anything is built.

The config dataclasses check each value on its own (``__post_init__``). What they cannot know
is checked here, in about the time the command line takes to parse: whether the files a config
names exist and hold what is expected (prompts, local model directories), whether a hub name can
be reached at all (offline mode, no network: said at once instead of after a minute of
retries), whether this machine has the accelerator the trainer asks for, and settings that only
make sense together (an inner batch larger than the synthetic set). A config that would crash
after minutes of model building or pretraining fails here with one message naming the key.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.common.hub import hub_offline, hub_reachable
from dpg_lightning.data.prompts import load_prompts
from dpg_lightning.data.text_sources import source_kind
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.dpg.rollout import SamplingConfig
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.set_size import SFTSet

#: Files that make a directory a transformers model / tokenizer directory.
_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and (
        os.sep in name
    )


def _in_hub_cache(repo_id: str, filename: str, repo_type: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:  # a malformed id: the hub check below names it
        return False
    return isinstance(found, str)


def check_hub_name(name: str, key: str, what: str, repo_type: str = "model") -> None:
    """``name`` is a hub id that can be loaded now: cached, or the hub is reachable."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"`{key}: {name}` is neither an existing local {what} directory nor a valid hub "
            "name (`org/name`); fix the path (relative paths start at "
            f"{Path.cwd()}) or the name"
        ) from None
    probe = "config.json" if repo_type == "model" else "README.md"
    if _in_hub_cache(name, probe, repo_type):
        return
    if hub_offline():
        raise ConfigError(
            f"`{key}: {name}` is a hub name, but HF_HUB_OFFLINE is set and it is not in the "
            "local hub cache; download it on a machine with network access (it is then "
            "cached), point the key at a local directory, or unset HF_HUB_OFFLINE"
        )
    if not hub_reachable():
        raise ConfigError(
            f"`{key}: {name}` is a hub name, but the hub cannot be reached from this machine "
            "and it is not in the local hub cache; point the key at a local directory (e.g. "
            "one written with save_pretrained), or run where the hub is reachable"
        )


def check_model_source(name: str | None, key: str, tokenizer_only: bool = False) -> None:
    """A ``pretrained``/``tokenizer`` value names a loadable local directory or hub id."""
    if name is None:
        return
    path = Path(name).expanduser()
    what = "tokenizer" if tokenizer_only else "model"
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"`{key}: {name}` is a file; give the {what} directory (the one "
                "save_pretrained wrote) or a hub name"
            )
        wanted = _TOKENIZER_FILES if tokenizer_only else _MODEL_FILES
        if not any((path / f).is_file() for f in wanted):
            raise ConfigError(
                f"`{key}: {name}` is a directory but not a transformers {what} directory (it "
                f"has none of {', '.join(wanted)}); give the directory that save_pretrained "
                "wrote"
            )
        return
    if _looks_like_path(name):
        raise ConfigError(
            f"`{key}: {name}` does not exist (relative paths start at {Path.cwd()}); give an "
            f"existing {what} directory or a hub name"
        )
    check_hub_name(name, key, what)


def check_accelerator(accelerator: Any, devices: Any) -> None:
    """The trainer's accelerator exists on this machine, with at least ``devices`` devices."""
    if not isinstance(accelerator, str) or accelerator in ("auto", "cpu"):
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    kinds = {"gpu": CUDAAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator}
    kind = kinds.get(accelerator)
    if kind is None:
        return  # an accelerator from a plugin: Lightning checks it
    if not kind.is_available():
        raise ConfigError(
            f"`trainer.accelerator: {accelerator}` but this machine has no such device "
            f"(torch sees none); use `--trainer.accelerator=cpu` here, or run on a machine with "
            "one"
        )
    count = kind.auto_device_count()
    if isinstance(devices, int) and devices > count:
        raise ConfigError(
            f"`trainer.devices: {devices}` but this machine has {count} {accelerator} "
            f"device(s); set `trainer.devices` to at most {count}"
        )


def check_ckpt_path(ckpt_path: str | None) -> None:
    """An explicit checkpoint file must exist (``last``/``best``/``hpc`` are Lightning's)."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"`--ckpt_path {ckpt_path}` does not exist; give a checkpoint file (*.ckpt) or "
            "`last` to resume the run's newest one"
        )


def check_inner_batch(model: dict, data: dict, trainer: dict) -> None:
    """``inner.batch_size`` must fit the synthetic set of a step (all ranks' with ``shared``),
    by the rule the run itself applies (:class:`SFTSet`). A key not given takes the default of
    the class it configures (the parsed config has them all; ``model.distributed`` and
    ``model.sft_groups`` fall back to ``DPGModule``'s, written here: ``run`` cannot import the
    module that imports it)."""
    inner, sampling = model.get("inner") or {}, model.get("sampling") or {}
    batch = inner.get("batch_size", InnerConfig.batch_size)
    num_prompts = data.get("num_prompts", _default(PromptDataModule, "num_prompts"))
    per_prompt = sampling.get("samples_per_prompt", SamplingConfig.samples_per_prompt)
    ranks = 1
    if model.get("distributed", "shared") == "shared":
        devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
        ranks = (devices if isinstance(devices, int) and devices > 0 else 1) * nodes
    if not all(isinstance(x, int) and x >= 1 for x in (batch, num_prompts, per_prompt, ranks)):
        return  # a bad value on its own: its config class names it
    groups = model.get("sft_groups", "all") == "inverse"
    try:
        SFTSet(num_prompts, per_prompt, ranks, groups).batch(batch)
    except ConfigError as err:
        raise err.at("model") from None


def _default(cls: type, name: str) -> Any:
    """The default of argument ``name`` of ``cls``'s constructor."""
    return inspect.signature(cls.__init__).parameters[name].default


def check_run(config: dict) -> None:
    """Every machine-dependent check of one subcommand's parsed config (``as_dict()`` form)."""
    model = config.get("model") or {}
    for role in ("generator", "target"):
        source = model.get(role) or {}
        check_model_source(source.get("pretrained"), f"model.{role}.pretrained")
        check_model_source(source.get("tokenizer"), f"model.{role}.tokenizer", True)
    trainer = config.get("trainer") or {}
    check_accelerator(trainer.get("accelerator"), trainer.get("devices"))
    check_ckpt_path(config.get("ckpt_path"))
    data = config.get("data") or {}
    if data:
        # An unreachable hub is said at once, not after datasets' half a minute of retries;
        # then every data setting is checked by loading the prompts.
        for key in ("prompt_file", "val_prompt_file"):
            source = data.get(key)
            if (isinstance(source, str) and source_kind(source, f"data.{key}") == "hub"
                    and not hub_offline() and not hub_reachable()):
                raise ConfigError(
                    f"`data.{key}: {source}` is a hub dataset, but the hub cannot be reached "
                    "from this machine; set HF_HUB_OFFLINE=1 to load it from the local cache, "
                    "or point the key at a local .txt, .jsonl or .parquet file"
                )
        load_prompts(**data)
    check_inner_batch(model, data, trainer)
