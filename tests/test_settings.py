"""Config dataclasses check themselves: a ``Literal`` field's choices come from its annotation
alone, errors name keys relative to the dataclass, and :meth:`ConfigError.at` (used by
``build_settings`` and the CLI) puts them where the config sits."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from dpg_lightning.common.errors import ConfigError, check_int_at_least
from dpg_lightning.common.settings import (
    Settings,
    build_settings,
    check_init_settings,
    literal_choices,
)
from dpg_lightning.inner.config import InnerConfig, ReplayConfig
from dpg_lightning.models.build import ModelConfig


@dataclasses.dataclass
class Toy(Settings):
    """No ``check_choice`` anywhere: the annotations are the only place the choices are."""

    mode: Literal["a", "b"] = "a"
    maybe: Literal[1, 2] | None = None
    size: int = 1

    def check(self) -> None:
        check_int_at_least("size", self.size, 1)


@dataclasses.dataclass
class Outer(Settings):
    toy: Toy = dataclasses.field(default_factory=Toy)


def test_literal_choices_are_read_from_the_annotation():
    assert literal_choices(Literal["a", "b"]) == ("a", "b")
    assert literal_choices(Literal[1, 2] | None) == (1, 2, None)
    assert literal_choices(int | None) is None and literal_choices(str) is None
    Toy(mode="b", maybe=None)
    Toy(maybe=2)
    with pytest.raises(ConfigError) as err:
        Toy(mode="c")
    assert err.value.key == "mode" and "`mode` is 'c'; use one of a | b" in str(err.value)
    with pytest.raises(ConfigError, match="`maybe` is 3; use one of 1 | 2 | null"):
        Toy(maybe=3)


def test_errors_name_keys_relative_to_the_dataclass():
    with pytest.raises(ConfigError) as err:
        InnerConfig(batch_size=0)
    assert err.value.key == "batch_size" and str(err.value).startswith("`batch_size` is 0")
    with pytest.raises(ConfigError) as err:
        InnerConfig(backend="bogus")  # a Literal field: no check_choice call checks it
    assert err.value.key == "backend" and "higher | func | replay" in str(err.value)
    with pytest.raises(ConfigError) as err:
        ModelConfig(hidden_size=64, num_heads=3)
    assert err.value.keys == ("hidden_size", "num_heads")
    assert "model." not in str(err.value)


def test_nested_settings_report_their_field():
    replay = ReplayConfig()
    replay.k = 0  # broken after it was built: the outer config checks it again
    with pytest.raises(ConfigError) as err:
        InnerConfig(replay=replay)
    assert err.value.key == "replay.k" and str(err.value).startswith("`replay.k` is 0")
    toy = Toy()
    toy.mode = "z"
    with pytest.raises(ConfigError, match="`toy.mode` is 'z'"):
        Outer(toy=toy)


def test_at_rekeys_every_named_key_and_nothing_else():
    err = ConfigError("`autocast: bf16` needs `backend: func` (not `replay`); see `autocast`",
                      "autocast", "backend")
    moved = err.at("model.inner")
    assert moved.keys == ("model.inner.autocast", "model.inner.backend")
    assert str(moved) == ("`model.inner.autocast: bf16` needs `model.inner.backend: func` "
                          "(not `replay`); see `model.inner.autocast`")
    assert isinstance(moved, ValueError) and moved.exit_code == 2
    assert ConfigError("no key here").at("model") is not None
    assert str(ConfigError("`x` is bad").at("model")) == "`x` is bad"  # no keys given


def test_build_settings_prefixes_nested_keys():
    with pytest.raises(ConfigError) as err:
        build_settings(InnerConfig, {"replay": {"k": 0}}, at="model.inner")
    assert err.value.key == "model.inner.replay.k"
    assert str(err.value).startswith("`model.inner.replay.k` is 0")
    built = build_settings(InnerConfig, {"optim": {"name": "adam"}, "batch_size": 4})
    assert built.optim.name == "adam" and built.batch_size == 4
    assert build_settings(ModelConfig, None, seed=1).seed == 1


def test_init_settings_are_keyed_by_argument():
    class Module:
        def __init__(self, target: ModelConfig | None = None, inner: InnerConfig | None = None,
                     seed: int = 0) -> None:
            pass

    check_init_settings(Module, {"target": {"seed": 3}, "seed": 1}, "model")
    with pytest.raises(ConfigError, match=r"^`model\.target\.dtype` is 'int8'"):
        check_init_settings(Module, {"target": {"dtype": "int8"}}, "model")
