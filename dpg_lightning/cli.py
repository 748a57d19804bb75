"""``python -m dpg_lightning <command>``: a thin LightningCLI plus the commands around a run.

``fit`` and ``validate`` are LightningCLI's (``test``/``predict`` are left out: a DPG module has
no test or predict step). ``sample`` and ``export`` use a trained generator
(:mod:`dpg_lightning.sample`). Defaults that every DPG run needs are set here, so configs stay
short: validation runs a plain SFT and needs autograd (``inference_mode: false``), and the
prompt stream is endless, so validation is scheduled every ``val_check_interval`` steps.

Before anything is built the CLI resolves the run's directory and checkpoint
(:mod:`dpg_lightning.run.run_dir`) and checks the config on this machine
(:mod:`dpg_lightning.run.preflight`); an error the user can act on prints one line and exits
non-zero (:func:`exit_on_run_error`); a run stopped by SIGTERM/SIGINT exits ``128 + signal``.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from dpg_lightning.cli_errors import (
    DPGArgumentParser,
    add_replaced_flags,
    check_replaced_flags,
    check_trainer_flags,
)
from dpg_lightning.common.errors import ConfigError, RunError
from dpg_lightning.common.settings import check_init_settings
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.inner.shared_sft import close_process_group
from dpg_lightning.module import DPGModule
from dpg_lightning.run.checkpoint_config import check_checkpoint_config
from dpg_lightning.run.checkpoint_files import AtomicCheckpointIO
from dpg_lightning.run.preflight import check_run
from dpg_lightning.run.run_dir import report, resolve_run
from dpg_lightning.run.stopping import GracefulShutdown
from dpg_lightning.run.threads import configure_threads

#: The commands, as ``--help`` lists them.
COMMANDS = {
    "fit": "train the generator (DPG) from a config: fit --config configs/....yaml",
    "validate": "validation Phi of a generator: validate --config ... --ckpt_path ...",
    "sample": "write a synthetic dataset (JSONL) from a trained generator",
    "export": "save a trained generator with save_pretrained (for transformers)",
    "plan": "memory, storage and time of one DPG step of a config, without a model or GPU",
    "check-rewards": "do a step's DPG rewards track exact leave-one-out? check-rewards --config "
                     "... --num_examples K --output F.json",
}


class DPGCLI(LightningCLI):
    """LightningCLI for DPG: one run directory, atomic checkpoints, config checks first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """LightningCLI with one-line config errors (:class:`DPGArgumentParser`) and without
        ``--optimizer``/``--lr_scheduler``: the generator's optimizer is ``model.policy``'s
        (the module optimizes manually), LightningCLI's would silently replace it."""
        kwargs.setdefault("parser_class", DPGArgumentParser)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only the trainer functions a DPG module implements."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: Any) -> None:
        """``optimizer``/``lr_scheduler`` only as ``null`` (the generator's optimizer is
        ``model.policy``'s; see :mod:`dpg_lightning.cli_errors`)."""
        if not self.auto_configure_optimizers:
            add_replaced_flags(parser)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``last``: the run's newest readable checkpoint) and the
        run directory, then refuse a checkpoint of another model instead of silently
        adopting its config (LightningCLI replaces the model config with the checkpoint's
        hyper-parameters; for another model that would quietly resume *that* model)."""
        sub = self.config.get("subcommand")
        if sub:
            run = resolve_run(self.config[sub], sub)
            report(run)
            quiet_run_notices(sub, resuming=run.step is not None)
        given = self.config[sub].get("model") if sub else None
        given = given.clone() if hasattr(given, "clone") else None
        super()._parse_ckpt_path()
        if given is not None:
            merged = self.config[sub]["model"]
            check_checkpoint_config(given.as_dict(), merged.as_dict(),
                                    verb="validating" if sub == "validate" else "resuming")

    def before_instantiate_classes(self) -> None:
        """Check the config dataclasses, then what the config names on this machine, before
        any class is built. The dataclasses are built here once from their config groups so
        that an error names its full key (``model.inner.batch_size``): a dataclass only knows
        its own fields, and the parser's own instantiation does not say where it failed."""
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        check_replaced_flags(config)
        check_trainer_flags(config.get("trainer"))
        check_init_settings(self.model_class, config.get("model"), "model")
        check_init_settings(self.datamodule_class, config.get("data"), "data")
        check_run(config.as_dict())

    def instantiate_classes(self) -> None:
        """Build the classes; a config error raised inside the model with keys relative to it
        (``metric``, from :func:`~dpg_lightning.metrics.base.check_metric`) gets its place
        (``model.metric``): the first key names a parameter of the model and none of the
        data module, so it cannot be the data module's."""
        try:
            super().instantiate_classes()
        except Exception as err:
            known = run_error(err)
            if isinstance(known, ConfigError) and known.key:
                head = known.key.split(".")[0]
                if head in _parameters(self.model_class) - _parameters(self.datamodule_class):
                    raise known.at("model") from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Write checkpoints atomically unless the config brings its own checkpoint IO, and
        keep W&B's files in the run directory (:func:`wandb_into_run_dir`) and its start-up
        free of a deprecation Lightning triggers (:func:`drop_unset_wandb_anonymous`)."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        wandb_into_run_dir(trainer)
        drop_unset_wandb_anonymous(trainer)
        return trainer


T = TypeVar("T")


def drop_unset_wandb_anonymous(trainer: Trainer) -> None:
    """Lightning's ``WandbLogger`` passes ``anonymous=None`` to ``wandb.init`` when the config
    leaves it unset, and W&B, which deprecated the setting, warns at every run start that it
    "has no effect" whenever the argument is passed at all: unset now means not passed."""
    for logger in trainer.loggers:
        if (isinstance(logger, WandbLogger) and logger._experiment is None
                and "anonymous" in logger._wandb_init
                and logger._wandb_init["anonymous"] is None):
            del logger._wandb_init["anonymous"]


def wandb_into_run_dir(trainer: Trainer) -> None:
    """A W&B logger whose config sets no ``save_dir``/``dir`` writes into the run directory
    (``trainer.log_dir``: the first logger's version directory), with the metrics, samples
    and checkpoints, not into ``./wandb`` of wherever the command was started. W&B starts
    lazily, at the first log, so its directory can still be chosen here. Lightning's default
    ``save_dir`` is ``"."`` (the parsed config holds it too), so ``"."`` counts as unset."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)
               and lg._experiment is None and lg._wandb_init.get("dir") in (None, ".")]
    if not loggers:
        return
    run_dir = trainer.log_dir or trainer.default_root_dir
    for logger in loggers:
        logger._wandb_init["dir"] = logger._save_dir = run_dir
    if trainer.is_global_zero:
        Path(run_dir).mkdir(parents=True, exist_ok=True)


#: Lightning's messages that say nothing about a DPG run: the models are in eval mode on
#: purpose (no dropout in rollouts or the inner SFT), and the rest are Lightning's own.
LIGHTNING_NOISE = (
    r"Found \d+ module\(s\) in eval mode",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


#: Lightning's log records (not warnings) that say nothing about a DPG run: its litlogger
#: advert, and its notice that the module's callbacks replace its default progress bar and
#: model table, which :meth:`DPGModule.configure_callbacks` does on purpose.
LIGHTNING_NOISE_RECORDS = (
    r"litlogger",
    r"configure_callbacks` will override existing callbacks passed to Trainer: "
    r"((RichProgressBar|TQDMProgressBar|RichModelSummary|ModelSummary)(, |$))+",
)


#: Lightning's warnings that say nothing under ``validate`` alone: it writes into a directory
#: of its own and saves no checkpoint, so ModelCheckpoint's notice that its top-k is not
#: reloaded there is moot (under ``fit`` it is not: a resume into another directory).
LIGHTNING_NOISE_VALIDATE = (r"The dirpath has changed from .* won't be reloaded",)


#: Lightning's warnings that say nothing when ``fit`` resumes a run: its checkpoints go on in
#: the run's own checkpoint directory, which is not empty on purpose.
LIGHTNING_NOISE_RESUME = (r"Checkpoint directory .* exists and is not empty",)


def quiet_run_notices(command: str, resuming: bool) -> None:
    """Hide the Lightning warnings that say nothing for this run: :data:`LIGHTNING_NOISE_VALIDATE`
    under ``validate``, :data:`LIGHTNING_NOISE_RESUME` when ``fit`` resumes (called once the
    run is resolved, where both are known)."""
    patterns = (LIGHTNING_NOISE_VALIDATE if command == "validate"
                else LIGHTNING_NOISE_RESUME if command == "fit" and resuming else ())
    for pattern in patterns:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_lightning() -> None:
    """Hide :data:`LIGHTNING_NOISE` and :data:`LIGHTNING_NOISE_RECORDS`, for this command only
    (the filters are installed where the CLI starts, not for library users or tests)."""
    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LightningNoise) for f in logger.filters):
            logger.addFilter(_LightningNoise())


class _LightningNoise(logging.Filter):
    """Drops the log records that match :data:`LIGHTNING_NOISE_RECORDS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.search(pattern, message) for pattern in LIGHTNING_NOISE_RECORDS)


def _parameters(cls: Any) -> set[str]:
    """The ``__init__`` parameter names of ``cls`` (none for ``None``)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"} if cls else set()


def run_error(err: BaseException) -> RunError | None:
    """The :class:`RunError` behind ``err`` (jsonargparse wraps errors raised while it builds
    config classes), or ``None`` when ``err`` is not one (a bug: keep its traceback)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RunError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_on_run_error(command: Callable[[], T]) -> T:
    """Run ``command``; a :class:`RunError` prints its message (no traceback) and exits with
    its status (2 for a config mistake)."""
    try:
        return command()
    except Exception as err:
        known = run_error(err)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr, flush=True)
        raise SystemExit(known.exit_code) from None


def lightning_main(args: list[str] | None = None) -> DPGCLI:
    """``fit`` / ``validate`` through LightningCLI (``args=None`` reads ``sys.argv``)."""
    quiet_lightning()
    cli = exit_on_run_error(lambda: DPGCLI(
        DPGModule,
        PromptDataModule,
        trainer_defaults={
            "inference_mode": False,
            "check_val_every_n_epoch": None,
            "val_check_interval": 10,
            "num_sanity_val_steps": 0,
            "max_steps": 20,
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    ))
    close_process_group()
    trainer = getattr(cli, "trainer", None)
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, GracefulShutdown) and cb.exit_code is not None:
            raise SystemExit(cb.exit_code)
    return cli


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return (
        "usage: python -m dpg_lightning <command> [options]   (or: dpg-lightning <command>)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "`<command> --help` lists a command's options; every config key can be given as "
        "--key.subkey=value."
    )


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m dpg_lightning`` and the ``dpg-lightning`` script."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(_usage(), file=sys.stdout if command else sys.stderr)
        raise SystemExit(0 if command else 2)
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    configure_threads()
    if command in ("sample", "export"):
        from dpg_lightning import sample

        return exit_on_run_error(lambda: getattr(sample, f"{command}_main")(argv[1:]))
    if command == "check-rewards":
        from dpg_lightning import check_rewards

        return exit_on_run_error(lambda: check_rewards.main(argv[1:]))
    if command == "plan":
        from dpg_lightning import plan

        return exit_on_run_error(lambda: plan.main(argv[1:]))
    return lightning_main(argv if args is not None else None)
