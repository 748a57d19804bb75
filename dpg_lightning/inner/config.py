"""Settings of the inner SFT (``model.inner`` in the YAML) and of its ``replay`` backend.

Both dataclasses check themselves when they are built (:class:`~dpg_lightning.common.settings.
Settings`), i.e. while the CLI parses the config, so a value that cannot work fails before any
model is built. Their errors name keys relative to themselves (``batch_size``, ``replay.k``);
the CLI prefixes them with ``model.inner``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dpg_lightning.common.errors import check_int_at_least, check_regex, require
from dpg_lightning.common.settings import Settings
from dpg_lightning.data.tokenization import TokenRows, tokenize_examples
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.inner.steps import LossRule

Backend = Literal["higher", "func", "replay", "first_order"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass
class ReplayConfig(Settings):
    """Settings of the ``replay`` backend (``inner.replay`` in the YAML).

    Attributes:
        checkpoint: which states the forward pass saves. ``every``: before every step (T saved
            states, no recompute); ``every_k``: before every ``k``-th step (T/k saved, each
            segment recomputed once in the reverse pass and buffered in CPU memory); ``sqrt``:
            ``every_k`` with ``k = ceil(sqrt(T))``, the classic sqrt(T) memory / one extra
            forward trade-off.
        k: segment length for ``every_k``.
        storage: ``cpu`` (host memory) or ``disk`` (files under ``directory``, deleted after the
            run); ``disk`` keeps host memory flat in T.
        directory: parent directory of the checkpoint files for ``disk`` (a fresh sub-directory
            is made per run); ``None`` uses the system temp directory.
        offload_adjoint: keep the adjoint the reverse pass carries from step to step (dPhi with
            respect to the weights and the optimizer moments: three weight copies with Adam) in
            ``storage`` between steps, and read each parameter's part back only when the
            backward through that parameter's update reaches it. Peak memory then holds about
            what a 1-step run holds, whatever the optimizer, for one write and one read of the
            adjoint per step. It helps where ``storage`` is not the memory the weights live in:
            ``disk``, or ``cpu`` with the target on an accelerator.
    """

    checkpoint: Literal["every", "every_k", "sqrt"] = "every"
    k: int = 4
    storage: Literal["cpu", "disk"] = "cpu"
    directory: str | None = None
    offload_adjoint: bool = False

    def check(self) -> None:
        """``k`` is a segment length (the choices are checked from the annotations)."""
        check_int_at_least("k", self.k, 1)


@dataclass
class InnerConfig(Settings):
    """Inner SFT settings.

    Attributes:
        optim: inner optimizer (SGD / Adam / AdamW with ``eps_root``).
        batch_size: examples per inner step (``inner_batch_size``); steps = ceil(N / batch_size).
        micro_batch_size: examples per forward/backward within a step (per rank): the step's
            gradient is accumulated over micro-batches of at most this many examples, so
            activation memory is set by the micro-batch, not the batch (``replay`` rebuilds
            one micro-batch's graph at a time also in its reverse pass). ``None``: the whole
            batch at once. The step (its loss, gradient and update) is the same either way.
        train_params: ``all``, ``lm_head`` (the output embedding; with tied weights that is the
            input embedding too), or a regex matched against ``named_parameters()`` names.
        backend: ``higher`` or ``func`` (same math, independent implementations, whole SFT on
            the tape) or ``replay`` (checkpointed, memory-bounded reverse pass; see
            :mod:`dpg_lightning.inner.replay` and ``replay`` below).
        shuffle: shuffle the synthetic set each SFT (order seeded per training step).
        max_length: target tokens per example, start and end token included (longer
            completions are truncated).
        autocast: ``bf16`` runs the inner forward under ``torch.autocast`` in bfloat16 (less
            activation memory, faster matmuls on GPUs) while the loss and metric stay in fp32;
            rewards then only approximate the fp32 ones (``benchmarks/knobs.py`` measures how
            well). ``none`` (default) leaves the computation untouched.
        activation_checkpointing: recompute each inner step's forward during its backward
            instead of storing its activations (``torch.utils.checkpoint``, non-reentrant, at
            the level of the whole step loss with the step's parameters passed explicitly, so
            the recompute sees the same weights; never transformers' own gradient
            checkpointing, which recomputes with the module's own parameters). ``func``
            backend only. Exact, but with the whole SFT on the tape the double backward keeps
            each step's recomputed activations alive, so it saves little (``benchmarks/``);
            ``replay`` bounds memory.
        loss_normalization: an example's loss is its ``token_mean`` cross-entropy (default),
            or its summed cross-entropy over ``max_length`` (the paper's: longer examples
            weigh more, and the loss scale no longer depends on the example's length).
        micro_batch_reduction: a step's loss is the ``mean`` over its examples (default), or
            the paper's ``sum_of_means`` over its micro-batches: the mean times
            ``ceil(batch_size / micro_batch_size)`` (8x for 128 x 8), which scales SGD's
            effective learning rate and moves Adam's ``eps`` regime.
        start_token: examples start with the tokenizer's bos (else eos) token, so their first
            text token is predicted (default); the paper's GPT-2 examples have none.
        end_token_target: the closing eos is a training target (default); the paper's is not
            (its pad token is eos, and the loss mask drops it).
        truncation: ``project`` (default) keeps ``max_length`` tokens, start and end token
            included; ``official`` keeps ``max_length`` input tokens and their ``max_length``
            next tokens, as the paper's code does with its ``sequence_length`` (up to
            ``max_length`` scored transitions, where ``project`` scores at most
            ``max_length - 2`` with the end token unscored).
        padding: ``masked`` (default) pads rows unattended and unscored; ``official_token0``
            does what the paper's inner SFT does: inputs and labels padded with token 0 up to
            ``max_length``, attended, and every padding position scored as "predict token 0"
            (its loss mask only drops eos), so it counts in the ``sum / max_length`` loss.
    """

    optim: InnerOptimConfig = field(default_factory=InnerOptimConfig)
    batch_size: int = 8
    micro_batch_size: int | None = None
    train_params: str = "all"
    backend: Backend = "higher"
    shuffle: bool = True
    max_length: int = 128
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    autocast: Literal["none", "bf16"] = "none"
    activation_checkpointing: bool = False
    loss_normalization: Literal["token_mean", "max_length"] = "token_mean"
    micro_batch_reduction: Literal["mean", "sum_of_means"] = "mean"
    start_token: bool = True
    end_token_target: bool = True
    truncation: Literal["project", "official"] = "project"
    padding: Literal["masked", "official_token0"] = "masked"

    def tokenize(self, texts: list[str], tokenizer) -> TokenRows:
        """SFT examples of ``texts`` in this config's format (length, start and end token,
        truncation, padding)."""
        return tokenize_examples(
            texts, tokenizer, self.max_length, self.start_token, self.end_token_target,
            self.truncation, self.padding,
        )

    def loss_rule(self) -> LossRule:
        """How a step's loss is formed, for the step functions."""
        return LossRule(
            micro_batch_size=self.micro_batch_size,
            per_token_of=self.max_length if self.loss_normalization == "max_length" else None,
            sum_micro_means=self.micro_batch_reduction == "sum_of_means",
            autocast=self.autocast,
        )

    def check(self) -> None:
        """Bounds, the ``train_params`` regex and the backend each option needs (the choices
        are checked from the annotations, ``optim`` and ``replay`` by themselves)."""
        check_int_at_least("batch_size", self.batch_size, 1)
        if self.micro_batch_size is not None:
            check_int_at_least("micro_batch_size", self.micro_batch_size, 1)
        check_int_at_least(
            "max_length", self.max_length, 3,
            "a start token, at least one text token and the end token",
        )
        if self.train_params not in ("all", "lm_head"):
            check_regex("train_params", self.train_params)
        require(
            not self.activation_checkpointing or self.backend == "func",
            "`activation_checkpointing: true` is implemented for `backend: func` only (got "
            f"{self.backend!r}); set `backend: func` or turn it off",
            "activation_checkpointing", "backend",
        )
        require(
            self.autocast == "none" or self.backend != "replay",
            f"`autocast: {self.autocast}` is not applied by `backend: replay`; use "
            "`backend: higher | func` or `autocast: none`",
            "autocast", "backend",
        )
