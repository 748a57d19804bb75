"""The inner SFT of the target on a synthetic set, plain or differentiable, and its attribution.

Everything here is a plain function of modules and tensors (no Lightning), so the metagradient
can be checked against finite differences of the very same SFT.

One SFT = one epoch over the synthetic set in a given order, ``batch_size`` examples per step.
Example i's loss is its mean token cross-entropy; a step's loss is ``sum_i eps_i * loss_i / B``
(B = examples in that step), so ``eps_i = 1`` is ordinary SFT and ``dPhi/deps_i`` is the effect
of up-weighting example i: its DPG reward.

Two independent backends compute the same thing (tests hold them to each other and to finite
differences): ``higher`` (the design card's engine, made correct by ``higher_compat``) and
``func`` (``torch.func.functional_call`` + ``autograd.grad(create_graph=True)``).

Shared SFT across ranks (``grad_reduce``): each rank holds a shard of the set, ``order`` holds the
rank's *local* indices of every global batch with ``-1`` for examples held by other ranks (so
``len(idx)`` is still the global B), and ``grad_reduce`` sums the per-rank step gradients with a
differentiable collective: together the ranks run exactly one SFT over the union (see
``dpg_lightning.distributed``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpg_lightning import higher_compat
from dpg_lightning.objectives import MetricOnTarget
from dpg_lightning.optim import InnerOptimConfig, init_state, optimizer_step
from dpg_lightning.replay import ReplayConfig

higher_compat.register()

Phi = Callable[[nn.Module], Tensor]
# Sums per-rank step gradients across ranks, differentiably (``None`` entries stay ``None``).
GradReduce = Callable[[list[Tensor | None]], list[Tensor | None]]


@dataclass
class InnerConfig:
    """Inner SFT settings.

    Attributes:
        optim: inner optimizer (SGD / Adam / AdamW with ``eps_root``).
        batch_size: examples per inner step (``inner_batch_size``); steps = ceil(N / batch_size).
        train_params: ``all``, ``lm_head`` (the output embedding; with tied weights that is the
            input embedding too), or a regex matched against ``named_parameters()`` names.
        backend: ``higher`` or ``func`` (same math, independent implementations, whole SFT on
            the tape) or ``replay`` (checkpointed, memory-bounded reverse pass; see
            ``dpg_lightning.replay`` and ``replay`` below).
        shuffle: shuffle the synthetic set each SFT (order seeded per training step).
        max_length: target tokens per example (longer completions are truncated).
        autocast: ``bf16`` runs the inner forward under ``torch.autocast`` in bfloat16 (less
            activation memory, faster matmuls on GPUs) while the loss and metric stay in fp32;
            rewards then only approximate the fp32 ones (``benchmarks/knobs.py`` measures how
            well). ``none`` (default) leaves the computation untouched.
        activation_checkpointing: recompute each inner step's forward during its backward
            instead of storing its activations (``torch.utils.checkpoint``, non-reentrant, at
            the level of the whole step loss with the step's parameters passed explicitly, so
            the recompute sees the same weights; never transformers' own gradient
            checkpointing, which recomputes with the module's own parameters). ``func``
            backend only. Exact (float64 tests: identical rewards), but with the whole SFT on
            the tape the double backward keeps each step's recomputed activations alive, so the
            measured peak barely moves (``benchmarks/README.md``); ``replay`` bounds memory.
    """

    optim: InnerOptimConfig = field(default_factory=InnerOptimConfig)
    batch_size: int = 8
    train_params: str = "all"
    backend: Literal["higher", "func", "replay"] = "higher"
    shuffle: bool = True
    max_length: int = 128
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    autocast: Literal["none", "bf16"] = "none"
    activation_checkpointing: bool = False


@dataclass
class SFTData:
    """A target-tokenized synthetic set, right-padded; ``labels`` is -100 on padding."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> SFTData:
        return SFTData(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def tokenize_examples(texts: list[str], tokenizer, max_length: int) -> SFTData:
    """Tokenize completions with the *target's* tokenizer as ``<start> text <eos>``.

    The start token (bos, else eos) gives the first text token a context, so every token of the
    text and the closing eos is predicted and counted in the loss.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [[start, *row[: max_length - 2], tokenizer.eos_token_id] for row in ids]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return SFTData(input_ids, mask, labels)


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each row over its non-pad tokens, shape ``[B]``."""
    targets = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    count = (targets != -100).sum(1).clamp(min=1)
    return tok.sum(1) / count


def trainable_names(target: nn.Module, spec: str) -> list[str]:
    """Names (as in ``named_parameters()``) of the parameters the inner SFT trains."""
    names = [n for n, _ in target.named_parameters()]
    if spec == "all":
        return names
    if spec == "lm_head":
        head = target.get_output_embeddings().weight
        chosen = [n for n, p in target.named_parameters() if p is head]
    else:
        chosen = [n for n in names if re.search(spec, n)]
    if not chosen:
        raise ValueError(
            f"`inner.train_params: {spec}` selects no parameter of the target; use `all`, "
            f"`lm_head`, or a regex over names such as {names[:3]}"
        )
    return chosen


def inner_order(n: int, batch_size: int, shuffle: bool, seed: int) -> list[Tensor]:
    """Index batches of one epoch over ``n`` examples (last batch may be smaller)."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(
            f"`inner.batch_size` is {batch_size} but the synthetic set has {n} examples "
            "(num_prompts x samples_per_prompt): choose 1 <= inner.batch_size <= that"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    return list(perm.split(batch_size))


def _batch_loss(forward, data: SFTData, idx: Tensor, eps: Tensor, autocast: str = "none") -> Tensor:
    """This rank's part of a step loss; ``-1`` in ``idx`` marks other ranks' examples.

    The divisor is the global batch size ``len(idx)``, so summing the ranks' gradients gives
    the gradient of the one global step loss. A rank holding none of the step's examples still
    runs a zero-weighted stand-in example: its step gradient is then an exact zero that is
    still connected to ``eps``, so every rank takes part in every collective, forward and
    backward (autograd skips nodes that do not lead to ``eps``, which would deadlock).
    """
    idx = idx.to(data.input_ids.device)
    local = idx[idx >= 0]
    weight = eps[local]
    if len(local) == 0:
        local, weight = idx.new_zeros(1), eps[:1] * 0
    device_type = data.input_ids.device.type
    bf16 = autocast == "bf16"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(data.input_ids[local], data.attention_mask[local]).logits
    losses = per_example_loss(logits.to(eps.dtype), data.labels[local])
    return (weight * losses).sum() / len(idx)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _func_sft(target, data, eps, phi, cfg, order, names, create_graph, grad_reduce=None):
    named = dict(target.named_parameters())
    params = [named[n].detach().requires_grad_() for n in names]
    state = init_state(params, cfg.optim)
    losses = []
    for idx in order:
        current = dict(zip(names, params))

        def forward(ids, mask, current=current):
            return torch.func.functional_call(target, current, (ids,), {"attention_mask": mask})

        if cfg.activation_checkpointing:
            # The step's parameters reach the recompute through ``current`` (the same tensors),
            # not through the module's own attributes, so the recomputed graph is the original.
            loss = checkpoint(
                _batch_loss, forward, data, idx, eps, cfg.autocast, use_reentrant=False
            )
        else:
            loss = _batch_loss(forward, data, idx, eps, cfg.autocast)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        if grad_reduce is not None:
            grads = grad_reduce(list(grads))
        params, state = optimizer_step(params, list(grads), state, cfg.optim)
        if not create_graph:
            params = [p.detach().requires_grad_() for p in params]
            state.exp_avg = [_detach(t) for t in state.exp_avg]
            state.exp_avg_sq = [_detach(t) for t in state.exp_avg_sq]
        losses.append(loss.detach())
    final = {f"target.{n}": p for n, p in zip(names, params)}
    return torch.func.functional_call(MetricOnTarget(target, phi), final, ()), losses


def _higher_sft(target, data, eps, phi, cfg, order, names, create_graph, grad_reduce=None):
    chosen = set(names)
    named = list(target.named_parameters())
    opt = cfg.optim.torch_class()([p for n, p in named if n in chosen], **cfg.optim.torch_kwargs())
    fmodel = higher.monkeypatch(target, copy_initial_weights=True, track_higher_grads=create_graph)
    fmodel.update_params([p.detach().requires_grad_(n in chosen) for n, p in named])
    higher_compat.patch_module_lists(fmodel)
    diffopt = higher.optim.get_diff_optim(
        opt,
        target.parameters(),
        fmodel=fmodel,
        override={"eps_root": [cfg.optim.eps_root]},
        track_higher_grads=create_graph,
    )
    losses = []
    for idx in order:
        loss = _batch_loss(
            lambda ids, mask: fmodel(ids, attention_mask=mask), data, idx, eps, cfg.autocast
        )
        diffopt.step(loss, grad_callback=grad_reduce)
        losses.append(loss.detach())
    return phi(fmodel), losses


def check_inner_config(cfg: InnerConfig) -> None:
    """Refuse memory knobs on a backend that would silently ignore them.

    ``DPGModule`` calls this at construction (before any model is built or pretrained); the
    SFT entry points call it again, since they are also used without the module.
    """
    if cfg.activation_checkpointing and cfg.backend != "func":
        raise ValueError(
            f"`inner.activation_checkpointing: true` is implemented for `inner.backend: func` "
            f"only (got {cfg.backend!r}); set `inner.backend: func` or turn it off"
        )
    if cfg.autocast != "none" and cfg.backend == "replay":
        raise ValueError(
            f"`inner.autocast: {cfg.autocast}` is not applied by `inner.backend: replay`; use "
            "`inner.backend: higher | func` or `inner.autocast: none`"
        )
    if cfg.autocast not in ("none", "bf16"):
        raise ValueError(f"`inner.autocast` is {cfg.autocast!r}; use none | bf16")


def run_sft(
    target: nn.Module,
    data: SFTData,
    eps: Tensor,
    phi: Phi,
    cfg: InnerConfig,
    order: list[Tensor],
    create_graph: bool,
    grad_reduce: GradReduce | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Train a copy of ``target`` (its weights are never modified) and return ``(Phi, losses)``.

    With ``create_graph`` the whole SFT stays on the autograd tape, so ``Phi`` can be
    differentiated w.r.t. ``eps``; without it this is plain SFT (graph freed every step), used
    for validation and the dataset-level reward. ``grad_reduce`` (shared SFT across ranks) must
    SUM the ranks' step gradients; the returned losses are then the global step losses.
    """
    check_inner_config(cfg)
    names = trainable_names(target, cfg.train_params)
    backend = _higher_sft if (create_graph and cfg.backend == "higher") else _func_sft
    with torch.enable_grad():
        value, losses = backend(
            target, data, eps, phi, cfg, order, names, create_graph, grad_reduce
        )
    if grad_reduce is not None:
        losses = list(grad_reduce([torch.stack(losses)])[0].unbind())
    return value, losses


def metagradient_rewards(
    target: nn.Module,
    data: SFTData,
    phi: Phi,
    cfg: InnerConfig,
    order: list[Tensor],
    times: dict[str, float] | None = None,
    grad_reduce: GradReduce | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """DPG rewards ``r_i = dPhi/deps_i`` at ``eps = 1``; returns ``(rewards, Phi, losses)``.

    ``times`` (if given) receives seconds spent in the forward SFT (``inner_sft``) and in the
    backward pass through it (``attribution``). With ``grad_reduce`` (shared SFT) the rewards
    are those of this rank's examples for the SFT over all ranks' examples.
    """
    if grad_reduce is not None and cfg.backend == "replay":
        raise ValueError(
            "`inner.backend: replay` does not support the shared multi-rank SFT; use "
            "`inner.backend: higher | func` or `model.distributed: independent`"
        )
    check_inner_config(cfg)
    if cfg.backend == "replay":
        from dpg_lightning.replay import replay_rewards

        return replay_rewards(target, data, phi, cfg, order, times)
    start = time.perf_counter()
    dtype = next(target.parameters()).dtype
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    eps = torch.ones(len(data), dtype=dtype, device=data.input_ids.device, requires_grad=True)
    value, losses = run_sft(target, data, eps, phi, cfg, order, True, grad_reduce)
    middle = time.perf_counter()
    (rewards,) = torch.autograd.grad(value, eps, allow_unused=True)
    if grad_reduce is not None and rewards is not None:
        # Every rank computed the same Phi and differentiates it; the backward of each SUM
        # all-reduce adds the ranks' upstream gradients, so what came back is the gradient of
        # world_size * Phi. The reduce of a one counts the ranks (any process group works).
        one = torch.ones((), dtype=rewards.dtype, device=rewards.device)
        rewards = rewards / grad_reduce([one])[0]
    if times is not None:
        times["inner_sft"] = middle - start
        times["attribution"] = time.perf_counter() - middle
    if rewards is None:
        rewards = torch.zeros_like(eps)
    return rewards.detach(), value.detach(), losses


def dataset_reward(
    target: nn.Module,
    data: SFTData,
    phi: Phi,
    cfg: InnerConfig,
    order: list[Tensor],
    grad_reduce: GradReduce | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Naive baseline: every example gets ``Phi(SFT(D))`` (same SFT, no metagradient)."""
    eps = torch.ones(len(data), device=data.input_ids.device)
    value, losses = run_sft(target, data, eps, phi, cfg, order, False, grad_reduce)
    value = value.detach()
    return value.expand(len(data)).clone(), value, losses
