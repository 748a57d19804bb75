"""Our functional optimizer steps reproduce torch.optim exactly (float64, 1e-12)."""

from __future__ import annotations

import higher
import pytest
import torch

from dpg_lightning.inner import higher_compat
from dpg_lightning.inner.optim import (
    InnerOptimConfig,
    OptimState,
    init_state,
    optimizer_step,
    optimizer_step_,
    update_vjp,
    used_slots,
)

# eps_root 0: torch.optim's Adam has none (the default, 1e-9, is tested below)
CASES = [
    InnerOptimConfig("sgd", lr=0.1),
    InnerOptimConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
    InnerOptimConfig("adam", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, eps_root=0.0),
    InnerOptimConfig("adam", lr=1e-2, weight_decay=0.1, eps_root=0.0),
    InnerOptimConfig("adamw", lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4, eps_root=0.0),
    InnerOptimConfig("adamw", lr=1e-1, weight_decay=0.5, eps=1e-3, eps_root=0.0),
]


def _grads(steps: int, shapes):
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-wd{c.weight_decay}-m{c.momentum}")
def test_functional_step_matches_torch_optim(cfg):
    shapes = [(3, 4), (5,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [p.clone().requires_grad_() for p in init]
    opt = cfg.torch_class()(ref, **cfg.torch_kwargs())
    params, state = [p.clone() for p in init], init_state(init)
    for grads in _grads(5, shapes):
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        params, state = optimizer_step(params, grads, state, cfg)
        for mine, theirs in zip(params, ref):
            torch.testing.assert_close(mine, theirs.detach(), rtol=1e-12, atol=1e-12)


def test_none_gradient_leaves_parameter_unchanged():
    p = [torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    out, _ = optimizer_step(
        p,
        [None, torch.ones(2, dtype=torch.float64)],
        init_state(p),
        InnerOptimConfig("adam", lr=0.1),
    )
    assert torch.equal(out[0], p[0]) and not torch.equal(out[1], p[1])


@pytest.mark.parametrize("cfg", CASES[2:], ids=lambda c: c.name)
def test_higher_uses_our_differentiable_adam(cfg):
    """torch.optim.Adam/AdamW inside ``higher`` get our (torch-exact) update, not 0.2.1's."""
    higher_compat.register()
    model = torch.nn.Linear(4, 3).double()
    opt = cfg.torch_class()(model.parameters(), **cfg.torch_kwargs())
    ref = torch.nn.Linear(4, 3).double()
    ref.load_state_dict(model.state_dict())
    ref_opt = cfg.torch_class()(ref.parameters(), **cfg.torch_kwargs())
    x = torch.randn(6, 4, dtype=torch.float64)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert type(diffopt).__module__ == higher_compat.__name__
        for _ in range(4):
            diffopt.step(fmodel(x).pow(2).sum())
            ref_opt.zero_grad()
            ref(x).pow(2).sum().backward()
            ref_opt.step()
        for mine, theirs in zip(fmodel.parameters(), ref.parameters()):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("cfg", "slots"),
    [
        (InnerOptimConfig("sgd"), (False, False)),
        (InnerOptimConfig("sgd", momentum=0.9), (True, False)),
        (InnerOptimConfig("adam", eps_root=0.0), (True, True)),
        (InnerOptimConfig("adamw", eps_root=0.0), (True, True)),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adamw"],
)
def test_state_holds_only_the_buffers_the_update_reads(cfg, slots):
    """Plain SGD allocates no moment buffers (two parameter-sized copies saved per SFT), and
    the steps taken from that sparse state still match ``torch.optim``."""
    init = [torch.randn(3, 4, dtype=torch.float64)]
    state = init_state(init, cfg)
    assert [state.exp_avg[0] is not None, state.exp_avg_sq[0] is not None] == list(slots)
    ref = [p.clone().requires_grad_() for p in init]
    opt = cfg.torch_class()(ref, **cfg.torch_kwargs())
    params = [p.clone() for p in init]
    for grads in _grads(3, [(3, 4)]):
        ref[0].grad = grads[0].clone()
        opt.step()
        params, state = optimizer_step(params, grads, state, cfg)
    torch.testing.assert_close(params[0], ref[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "cfg",
    CASES + [InnerOptimConfig("adam", lr=1e-2, eps_root=1e-8)],
    ids=lambda c: f"{c.name}-wd{c.weight_decay}-m{c.momentum}-r{c.eps_root}",
)
def test_in_place_step_is_bit_identical(cfg, dtype):
    """The replay forward pass updates in place; its trajectory must be the very one the
    functional step (which the reverse pass differentiates) produces: equal, not close."""
    shapes = [(3, 4), (5,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    state = init_state(params, cfg)
    work = [p.clone() for p in params]
    work_state = init_state(work, cfg)
    for grads in _grads(5, shapes):
        grads = [g.to(dtype) for g in grads]
        params, state = optimizer_step(params, grads, state, cfg)
        work_state = optimizer_step_(work, [g.clone() for g in grads], work_state, cfg)
        assert work_state.step == state.step
        mine = work + work_state.exp_avg + work_state.exp_avg_sq
        ref = params + state.exp_avg + state.exp_avg_sq
        for a, b in zip(mine, ref, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# (optimizer, which output adjoints are given); plain SGD has no moments to give.
VJP_CASES = [
    pytest.param(cfg, given, id=f"{cfg.name}-wd{cfg.weight_decay}-m{cfg.momentum}-"
                 f"r{cfg.eps_root}-{given}")
    for cfg in CASES + [InnerOptimConfig("adam", lr=1e-2, eps_root=1e-8, weight_decay=0.1)]
    for given in ("all", "params_only", "moments_only")
    if given != "moments_only" or any(used_slots(cfg))
]


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("cfg, given", VJP_CASES)
def test_update_vjp_matches_autograd(cfg, step, given):
    """The closed-form VJP of one update (used by the replay reverse pass) equals autograd's
    VJP of :func:`optimizer_step` to rounding, for every input and every output adjoint."""
    gen = torch.Generator().manual_seed(step)

    def rand(positive: bool = False) -> torch.Tensor:
        x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        return x.abs() + 0.1 if positive else x

    slots = used_slots(cfg)
    p, g = rand().requires_grad_(), rand().requires_grad_()
    m = rand().requires_grad_() if slots[0] else None
    v = rand(positive=True).requires_grad_() if slots[1] else None
    (p_new,), out = optimizer_step([p], [g], OptimState(step - 1, [m], [v]), cfg)
    outs = [p_new, out.exp_avg[0], out.exp_avg_sq[0]]
    adj = [rand() if x is not None and x.requires_grad else None for x in outs]
    if given == "params_only":
        adj[1:] = [None, None]
    elif given == "moments_only":
        adj[0] = None
    assert any(a is not None for a in adj)
    pairs = [(o, a) for o, a in zip(outs, adj) if a is not None]
    inputs = [x for x in (p, g, m, v) if x is not None]
    want = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True
    )
    got = update_vjp(
        p.detach(),
        g.detach(),
        None if m is None else m.detach(),
        None if v is None else v.detach(),
        step,
        cfg,
        tuple(a.clone() if a is not None else None for a in adj),
    )
    named = [(n, x) for n, x, i in zip("pgmv", got, (p, g, m, v)) if i is not None]
    for (name, a), b in zip(named, want, strict=True):
        if b is None or not b.abs().max():
            assert a is None or not a.abs().max(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
