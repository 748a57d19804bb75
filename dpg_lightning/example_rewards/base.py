"""The per-example reward interface: texts in, one float per example out, no inner SFT.

A reward is any callable shaped like TRL's reward functions. A class subclasses
:class:`ExampleReward`::

    class MyReward(ExampleReward):
        def bind(self, tokenizer, reference_texts):      # once, at start-up
            self.refs = reference_texts
        def __call__(self, texts, token_ids, prompts):   # every step
            return [float(len(t)) for t in texts]

and is selected like a metric (``model.example_reward: {class_path: ..., init_args: ...}``).
A plain function needs no class: :class:`FunctionReward` calls it with TRL's keywords
(``prompts``, ``completions``, ``completion_ids``) plus ``reference_texts`` and ``tokenizer``, so
a TRL reward function (which takes ``**kwargs``) works unchanged.

What a step passes: ``texts`` are the generator's completions (the examples the target would be
SFT'd on), ``token_ids`` the generator's token ids of each completion, ``prompts`` the prompts
they answer, all in the step's (prompt-major) order. ``bind`` receives the *target's* tokenizer
and the target-metric set (:func:`reference_texts_of`), the texts the objective is measured on.
:func:`check_example_reward` runs once at start-up so that a reward that cannot work fails before
the first rollout, and :func:`score_examples` checks each step's answer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dpg_lightning.common.errors import ConfigError, RunError
from dpg_lightning.data.tokenization import encode
from dpg_lightning.metrics.user_metric import import_callable


class ExampleReward:
    """Base class of per-example rewards (see the module docstring)."""

    def bind(self, tokenizer: Any, reference_texts: Sequence[str]) -> None:
        """Called once before training with the target's tokenizer and the target-metric set
        (default: nothing). Precompute what every step reuses here (the set's token ids,
        embeddings or language)."""

    def __call__(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts: Sequence[str]
    ) -> list[float]:
        """One reward per example, higher is better."""
        raise NotImplementedError


class FunctionReward(ExampleReward):
    """A plain function as a reward, by import path (``package.module.function``).

    The function is called as ``fn(prompts=..., completions=..., completion_ids=...,
    reference_texts=..., tokenizer=..., **kwargs)`` (TRL's keywords, plus the target-metric set
    and the target tokenizer) and returns one number per completion.

    Args:
        fn: the function's import path, or (from Python) the function itself.
        kwargs: extra keyword arguments passed to every call.
    """

    def __init__(self, fn: str | Callable[..., Sequence[float]],
                 kwargs: dict[str, Any] | None = None) -> None:
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        if inspect.isclass(self.fn):
            raise ConfigError(
                f"example reward {fn!r} is a class: give it directly as "
                "`model.example_reward.class_path` instead of wrapping it"
            )
        self.__name__ = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
        self.kwargs = dict(kwargs or {})
        self.tokenizer: Any = None
        self.reference_texts: list[str] = []

    def bind(self, tokenizer: Any, reference_texts: Sequence[str]) -> None:
        self.tokenizer, self.reference_texts = tokenizer, list(reference_texts)

    def __call__(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts: Sequence[str]
    ) -> list[float]:
        return self.fn(prompts=list(prompts), completions=list(texts),
                       completion_ids=[list(ids) for ids in token_ids],
                       reference_texts=self.reference_texts, tokenizer=self.tokenizer,
                       **self.kwargs)


def reward_name(reward: Callable) -> str:
    """A name for messages: the function's path or the class's name."""
    return getattr(reward, "__name__", type(reward).__name__)


def reference_texts_of(metric: Any) -> list[str]:
    """The target-metric set an example reward compares examples with: the metric's
    ``reference_texts()`` (the language metric's passages, the UUID metric's string)."""
    get = getattr(metric, "reference_texts", None)
    texts = list(get()) if callable(get) else []
    if not texts:
        raise ConfigError(
            f"`model.reward: example` compares examples with the target metric's texts, but "
            f"`model.metric` ({type(metric).__name__}) has none; use a metric with a "
            "`reference_texts()` method, e.g. dpg_lightning.metrics.likelihood.LastWordLikelihood"
        )
    return texts


def _as_rewards(values: Any, n: int, name: str) -> list[float]:
    """``values`` as ``n`` floats; a :class:`RunError` naming what is wrong otherwise."""
    if isinstance(values, Tensor):
        values = values.detach().reshape(-1).tolist()
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise RunError(
            f"example reward {name} returned {type(values).__name__} ({err}); it must return "
            "a list with one number per example"
        ) from None
    if len(floats) != n:
        raise RunError(
            f"example reward {name} returned {len(floats)} values for {n} examples; it must "
            "return one number per example, in the order of `texts`"
        )
    return floats


def score_examples(
    reward: Callable[..., Any], texts: Sequence[str], token_ids: Sequence[Sequence[int]],
    prompts: Sequence[str],
) -> Tensor:
    """A step's rewards as a float64 tensor; fails (:class:`RunError`) unless the reward
    returned one number per example. Non-finite values pass: the run's divergence check
    counts them like non-finite metagradients."""
    values = reward(list(texts), [list(ids) for ids in token_ids], list(prompts))
    return torch.tensor(_as_rewards(values, len(texts), reward_name(reward)),
                        dtype=torch.float64)


def check_example_reward(
    reward: Callable[..., Any], tokenizer: Any, reference_texts: Sequence[str],
    texts: Sequence[str] | None = None,
) -> list[float]:
    """Bind ``reward`` and fail fast unless it returns one finite number per example.

    Runs once at start-up, before any rollout: the examples are ``texts`` (default: the first
    two reference texts and a text that is none of them), tokenized with ``tokenizer``.
    Returns their rewards. Raises :class:`ConfigError` saying what to fix.
    """
    name = reward_name(reward)
    if not callable(reward):
        raise ConfigError(f"`model.example_reward` ({name}) is not callable; give a class with "
                          "`__call__(texts, token_ids, prompts)` or use FunctionReward")
    refs = list(reference_texts)
    sample = list(texts) if texts is not None else [*refs[:2], "A text of no set."]
    bind = getattr(reward, "bind", None)
    try:
        if callable(bind):
            bind(tokenizer, refs)
        ids = [encode(tokenizer, t) for t in sample]
        values = score_examples(reward, sample, ids, [""] * len(sample))
    except (ConfigError, ImportError) as err:
        raise ConfigError(f"example reward {name}: {err}") from err
    except Exception as err:  # a user's bug: name the reward, keep the cause
        raise ConfigError(
            f"example reward {name} failed on {len(sample)} start-up examples: "
            f"{type(err).__name__}: {err}"
        ) from err
    bad = [v for v in values.tolist() if not math.isfinite(v)]
    if bad:
        raise ConfigError(
            f"example reward {name} returned non-finite values {bad} at start-up; it must "
            "return a finite number per example"
        )
    return values.tolist()
