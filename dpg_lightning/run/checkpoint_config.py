"""Does a checkpoint belong to the configured model? One message that names what differs.

Resuming a checkpoint of another model either fails deep in ``load_state_dict`` with a wall of
shape mismatches or, with equal shapes, silently becomes another experiment; the check here
turns both into one message that names what differs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

from dpg_lightning.common.errors import ConfigError


def plain(value: Any) -> Any:
    """Hyper-parameters as plain values: dataclasses to dicts, tuples to lists, recursively
    (checkpoints pickle the config dataclasses; a parsed config holds dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# Model hyper-parameters that make a checkpoint another run: resuming across them is an error.
IDENTITY_KEYS = ("generator", "target", "reward", "distributed")


#: Whose values win where a checkpoint's settings and the config's differ: a resume (or
#: ``validate``) through ``LightningCLI`` rebuilds the model from the checkpoint's
#: hyper-parameters; ``sample``, ``export`` and ``check-rewards`` build it from the config and
#: take only the generator's weights from the checkpoint.
_RESTORED = ("the checkpoint's values are used (LightningCLI restores a model from its "
             "checkpoint's hyper-parameters)")
USED = {
    "resuming": _RESTORED,
    "validating": _RESTORED,
    "loading": "the config's values are used, with the checkpoint's generator weights; give "
               "the run's config.yaml (in its run directory) for the values it was trained with",
}


def check_checkpoint_config(
    current: dict[str, Any], saved: dict[str, Any],
    verb: Literal["resuming", "validating", "loading"] = "resuming",
) -> None:
    """Error on a checkpoint of a different model; warn about other changed hyper-parameters.

    Why an error: a checkpoint of another architecture otherwise fails deep in
    ``load_state_dict`` with a wall of shape mismatches, and one of the same shapes but another
    reward/target/sharing would silently become a different experiment. ``LightningCLI``
    rebuilds the model from the checkpoint's hyper-parameters, replacing the config's, so the
    CLI calls this before that happens (``DPGCLI``); ``on_load_checkpoint`` covers the rest.
    """
    differ = sorted(k for k in set(current) | set(saved)
                    if k in current and k in saved and current[k] != saved[k])
    fatal = [k for k in differ if k in IDENTITY_KEYS]
    if fatal:
        lines = "\n".join(_diff_lines(f"model.{k}", saved[k], current[k]) for k in fatal)
        raise ConfigError(
            "the checkpoint was trained with a different model configuration, so it cannot be "
            f"resumed with this config:\n{lines}\nresume with the config the checkpoint was "
            "trained with (config.yaml in its run directory) or start a fresh run"
        )
    if differ:
        lines = "\n".join(_diff_lines(f"model.{k}", saved[k], current[k]) for k in differ)
        warnings.warn(f"{verb} with changed model settings:\n{lines}\n{USED[verb]}",
                      stacklevel=2)


def _diff_lines(key: str, saved: Any, current: Any) -> str:
    """``key: checkpoint X, config Y`` for each differing leaf (nested dicts are walked)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return "\n".join(_diff_lines(f"{key}.{k}", saved.get(k), current.get(k)) for k in keys)
    return f"  {key}: checkpoint {saved!r}, config {current!r}"
