"""Differentiable inner optimizers: one functional SGD / Adam / AdamW step, shared by backends.

``torch.optim`` mutates parameters in place, so it cannot be differentiated through. These
functions return new tensors instead, with the exact update rule of ``torch.optim.SGD``,
``torch.optim.Adam`` and ``torch.optim.AdamW`` (checked to 1e-12 in float64 in the tests), plus
``eps_root`` inside Adam's square root (as in optax): ``sqrt(v_hat + eps_root)``. Without it the
derivative of ``sqrt(v)`` is infinite wherever a second moment is zero (any parameter whose
gradient is zero, e.g. embeddings of tokens not in the batch) and the metagradient turns NaN.
So ``eps_root`` defaults to the paper's 1e-9, not 0: a run must not need to know this to get
finite rewards. ``eps_root: 0`` gives ``torch.optim``'s update exactly (the tests use it to
compare with ``torch.optim``); SGD never reads ``eps_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dpg_lightning.common.errors import check_positive, require
from dpg_lightning.common.settings import Settings


@dataclass
class InnerOptimConfig(Settings):
    """Hyper-parameters of the inner (target) optimizer.

    ``adam`` couples weight decay into the gradient (L2, like ``torch.optim.Adam``); ``adamw``
    decays the weights directly (like ``torch.optim.AdamW``); ``sgd`` adds L2 to the gradient.
    ``eps_root`` (Adam/AdamW only) keeps the metagradient finite where a second moment is 0
    (the module docstring); 1e-9 is the paper's value and changes an update by about
    ``lr * 5e-10 / sqrt(v_hat)`` relative, far below what the target learns.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-9
    weight_decay: float = 0.0
    momentum: float = 0.0

    def check(self) -> None:
        """Bounds of the hyper-parameters (``name`` is checked from its annotation); ``betas``
        becomes a tuple (YAML gives a list)."""
        check_positive("lr", self.lr)
        self.betas = tuple(self.betas)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"`betas` is {list(self.betas)}; give two values in [0, 1), e.g. [0.9, 0.999]",
            "betas",
        )
        for name in ("eps", "eps_root", "weight_decay"):
            check_positive(name, getattr(self, name), allow_zero=True)
        require(0 <= self.momentum < 1, f"`momentum` is {self.momentum}; it must be in [0, 1)",
                "momentum")

    def torch_class(self) -> type[torch.optim.Optimizer]:
        """The ``torch.optim`` class whose math this config reproduces."""
        return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
            self.name
        ]

    def torch_kwargs(self) -> dict:
        """Constructor kwargs for :meth:`torch_class` (``eps_root`` has no torch equivalent)."""
        if self.name == "sgd":
            return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return dict(
            lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay
        )


@dataclass
class OptimState:
    """Functional optimizer state for a list of parameters (step count, moments, momentum)."""

    step: int = 0
    exp_avg: list[Tensor] = field(default_factory=list)
    exp_avg_sq: list[Tensor] = field(default_factory=list)


def sgd_update(p: Tensor, g: Tensor, buf: Tensor | None, cfg: InnerOptimConfig, first: bool):
    """One ``torch.optim.SGD`` step (no dampening/nesterov); returns ``(p_new, momentum_buf)``."""
    if cfg.weight_decay:
        g = g + cfg.weight_decay * p
    if cfg.momentum:
        buf = g if first else buf * cfg.momentum + g
        g = buf
    return p - cfg.lr * g, buf


def adam_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, cfg: InnerOptimConfig):
    """One ``torch.optim.Adam``/``AdamW`` step at 1-based ``step``; returns ``(p, m, v)``."""
    beta1, beta2 = cfg.betas
    if cfg.weight_decay:
        if cfg.name == "adamw":
            p = p * (1 - cfg.lr * cfg.weight_decay)
        else:
            g = g + cfg.weight_decay * p
    m = m * beta1 + (1 - beta1) * g
    v = v * beta2 + (1 - beta2) * g * g
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    if cfg.eps_root:
        denom = (v / bias2 + cfg.eps_root).sqrt() + cfg.eps
    else:
        denom = v.sqrt() / bias2**0.5 + cfg.eps
    return p - (cfg.lr / bias1) * m / denom, m, v


def used_slots(cfg: InnerOptimConfig | None) -> tuple[bool, bool]:
    """Which state lists the update reads: (``exp_avg`` / SGD momentum, ``exp_avg_sq``).

    ``None`` (no config) means both, the safe default.
    """
    if cfg is None:
        return True, True
    if cfg.name == "sgd":
        return bool(cfg.momentum), False
    return True, True


def init_state(params: list[Tensor], cfg: InnerOptimConfig | None = None) -> OptimState:
    """Zero moments for ``params``, only for the lists ``cfg``'s update reads.

    A list the update never reads holds ``None``s: for plain SGD that saves two
    parameter-sized buffers per SFT.
    """
    first, second = used_slots(cfg)

    def zeros(used: bool) -> list:
        return [torch.zeros_like(p) if used else None for p in params]

    return OptimState(0, zeros(first), zeros(second))


def optimizer_step(
    params: list[Tensor], grads: list[Tensor | None], state: OptimState, cfg: InnerOptimConfig
) -> tuple[list[Tensor], OptimState]:
    """Apply one functional step of ``cfg`` to every parameter; ``None`` grads leave it as is."""
    step = state.step + 1
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq):
        if g is None:
            new_p.append(p), new_m.append(m), new_v.append(v)
            continue
        if cfg.name == "sgd":
            p, m = sgd_update(p, g, m, cfg, first=step == 1)
        else:
            p, m, v = adam_update(p, g, m, v, step, cfg)
        new_p.append(p), new_m.append(m), new_v.append(v)
    return new_p, OptimState(step, new_m, new_v)


@torch.no_grad()
def optimizer_step_(
    params: list[Tensor], grads: list[Tensor | None], state: OptimState, cfg: InnerOptimConfig
) -> OptimState:
    """:func:`optimizer_step` in place, for graph-free loops (the ``replay`` forward pass).

    The same operations in the same order, each rounded the same way, so the results are
    bit for bit those of :func:`optimizer_step` (tested); but the parameters and moments are
    overwritten instead of copied, which saves an allocation and a copy of every parameter
    per step and never holds the old and the new weights at once. ``grads`` are consumed
    (weight decay is added into them). Returns the state with its step advanced (same tensors).
    """
    step = state.step + 1
    for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq):
        if g is None:
            continue
        if cfg.name == "sgd":
            if cfg.weight_decay:
                g.add_(cfg.weight_decay * p)
            if cfg.momentum:
                g = m.copy_(g) if step == 1 else m.mul_(cfg.momentum).add_(g)
            p.sub_(cfg.lr * g)
            continue
        beta1, beta2 = cfg.betas
        if cfg.weight_decay:
            if cfg.name == "adamw":
                p.mul_(1 - cfg.lr * cfg.weight_decay)
            else:
                g.add_(cfg.weight_decay * p)
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        if cfg.eps_root:
            denom = (v / bias2 + cfg.eps_root).sqrt_().add_(cfg.eps)
        else:
            denom = (v.sqrt() / bias2**0.5).add_(cfg.eps)
        p.sub_((cfg.lr / bias1) * m / denom)
    return OptimState(step, state.exp_avg, state.exp_avg_sq)


@torch.no_grad()
def update_vjp(
    p: Tensor,
    g: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    step: int,
    cfg: InnerOptimConfig,
    adj: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """The vector-Jacobian product of one parameter's update, in closed form.

    For the update ``(p', m', v') = step(p, g, m, v)`` of :func:`optimizer_step` at 1-based
    ``step`` and the adjoint ``adj = (P, M, V)`` of its outputs (``None`` for zero), returns
    ``(dp, dg, dm, dv)``: ``P.dp'/dp + M.dm'/dp + V.dv'/dp`` and likewise for ``g``, ``m`` and
    ``v``, where ``dp`` counts only the explicit dependence (weight decay, and ``p'`` on ``p``);
    the dependence through ``g = grad L(p)`` is the caller's Hessian-vector product with
    ``dg``. ``None`` where the input has no influence (plain SGD's moments, SGD momentum at
    step 1).

    Why by hand: differentiating the update with autograd builds a graph of a dozen
    weight-sized intermediates per parameter and runs about three dozen elementwise passes
    over every weight per inner step, which dominated a replay step's time and peak memory
    (``benchmarks/README.md``). Checked against autograd of
    :func:`optimizer_step` in float64 for every optimizer setting (``tests/test_optim.py``).
    ``adj`` tensors may be overwritten (the caller hands them over).
    """
    P, M, V = (None if a is None else a.contiguous() for a in adj)
    wd, lr = cfg.weight_decay, cfg.lr
    if cfg.name == "sgd":
        # p' = p - lr * b',  b' = g_eff (step 1) or mu * b + g_eff,  g_eff = g + wd * p
        if P is None:
            dg = torch.zeros_like(g) if M is None else M
        else:
            dg = P * -lr if M is None else M.sub_(P, alpha=lr)
        dm = dg * cfg.momentum if cfg.momentum and step > 1 else None
        dp = P
        if wd:
            dp = dg * wd if dp is None else dp.add_(dg, alpha=wd)
        return dp, dg, dm, None
    beta1, beta2 = cfg.betas
    g_eff = g + wd * p if wd and cfg.name == "adam" else g
    m_new = m * beta1 + (1 - beta1) * g_eff
    v_new = v * beta2 + (1 - beta2) * g_eff * g_eff
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    if cfg.eps_root:
        root = (v_new / bias2 + cfg.eps_root).sqrt_()
        denom = root + cfg.eps
        droot = root.mul_(2 * bias2)  # d denom / d v' = 1 / (2 bias2 root)
    else:
        root = v_new.sqrt_()
        denom = root / bias2**0.5 + cfg.eps
        droot = root.mul_(2 * bias2**0.5)  # d denom / d v' = 1 / (2 sqrt(bias2) sqrt(v'))
    del v_new
    scale = lr / bias1
    # M_tot = M + P dp'/dm',  V_tot = V + P dp'/dv'  (dp'/dm' = -scale / denom,
    # dp'/dv' = scale m' / denom^2 * d denom / d v')
    if P is None:
        m_tot = torch.zeros_like(g) if M is None else M
        v_tot = torch.zeros_like(g) if V is None else V
    else:
        p_over = P * scale / denom
        m_tot = p_over.neg() if M is None else M.sub_(p_over)
        p_over.mul_(m_new).div_(denom).div_(droot)
        v_tot = p_over if V is None else V.add_(p_over)
        del p_over
    del m_new, denom, droot
    dg = m_tot * (1 - beta1)
    dg.addcmul_(g_eff, v_tot, value=2 * (1 - beta2))
    dm, dv = m_tot.mul_(beta1), v_tot.mul_(beta2)
    dp = P
    if wd:
        if cfg.name == "adamw":
            dp = None if P is None else P.mul_(1 - lr * wd)
        else:
            dp = dg * wd if P is None else P.add_(dg, alpha=wd)
    return dp, dg, dm, dv
