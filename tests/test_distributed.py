"""The shared inner SFT across ranks equals one single-process SFT over the union (gloo, CPU).

Two processes each hold half of N examples; their rewards (``metagradient_rewards`` with the
differentiable gradient all-reduce and the sharded global order) must match the rewards of a
single process holding all N examples in the same global order, to 1e-6 relative in float64,
for every backend (``replay`` sums the ranks' Hessian-vector products after each reverse step),
with shuffled batches, with batches that lie wholly on one rank (so the other rank runs the
zero-weight stand-in), with Adam, and in micro-batches (to 1e-10 of the unsplit SFT).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.dpg.policy import policy_loss
from dpg_lightning.dpg.rollout import SamplingConfig, completion_logprobs, sample_rollout
from dpg_lightning.inner import (
    InnerConfig,
    dataset_reward,
    metagradient_rewards,
    per_example_loss,
)
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.inner.shared_sft import (
    WorldInfo,
    all_gather_cat,
    rank_order,
    shard_order,
    world_info,
)
from dpg_lightning.models.build import ModelConfig, build_model, byte_tokenizer
from dpg_lightning.run.slurm import check_slurm_launch

N = 8
TEXTS = [
    "the cat sat", "a dog ran far", "hello", "zebra crossing at noon", "xyz", "one two three",
    "dpg", "metagradient rewards",
]
CASES = {
    # name: (backend, shuffle, batch_size, optimizer)
    "higher_shuffled_sgd": ("higher", True, 3, InnerOptimConfig(name="sgd", lr=0.5)),
    "func_shuffled_sgd": ("func", True, 3, InnerOptimConfig(name="sgd", lr=0.5)),
    # unshuffled batches of 2 lie wholly on one rank: the other rank has no example in them
    "higher_one_rank_batches": ("higher", False, 2, InnerOptimConfig(name="sgd", lr=0.5)),
    "func_adam": (
        "func", True, 4, InnerOptimConfig(name="adam", lr=0.01, eps_root=1e-12, weight_decay=0.1)
    ),
    "higher_adamw": (
        "higher", True, 4, InnerOptimConfig(name="adamw", lr=0.01, eps_root=1e-12, weight_decay=0.1)
    ),
    # replay: the ranks' Hessian-vector products summed after each reverse step
    "replay_adam": (
        "replay", True, 3, InnerOptimConfig(name="adam", lr=0.01, eps_root=1e-12, weight_decay=0.1)
    ),
    "replay_one_rank_batches_sgd": ("replay", False, 2, InnerOptimConfig(name="sgd", lr=0.5)),
}
# Shared SFTs whose ranks split their examples of each step into micro-batches of one
# (batches of 3 leave a last partial batch of 2): held to the unsplit single-process SFT.
MICRO_CASES = {
    "func_adam_micro": ("func", True, 4, CASES["func_adam"][3]),
    "higher_adamw_micro": ("higher", True, 3, CASES["higher_adamw"][3]),
    "replay_adam_micro": ("replay", True, 4, CASES["replay_adam"][3]),
}
SEED = 3


def _setup():
    tok = byte_tokenizer()
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=1,
                      dtype="float64")
    target = build_model(cfg, len(tok)).requires_grad_(False)
    data = tokenize_examples(TEXTS, tok, max_length=24)
    probe = tokenize_examples(["probe text for phi"], tok, max_length=24)

    def phi(model) -> torch.Tensor:
        logits = model(probe.input_ids, attention_mask=probe.attention_mask).logits
        return -per_example_loss(logits, probe.labels).mean()

    return target, data, phi


def _policy_grads(rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Generator gradients of the policy loss on this rank's rows of one fixed rollout.

    With ``world > 1`` the generator is wrapped in DDP (which averages gradients), as Lightning
    does; the rollout and the global advantages are the same on every rank.
    """
    tok = byte_tokenizer()
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0,
                      dtype="float64")
    gen = build_model(cfg, len(tok))
    torch.manual_seed(0)
    rollout = sample_rollout(gen, tok, ["ab", "cd", "efg", "h"],
                             SamplingConfig(samples_per_prompt=2, max_new_tokens=6))
    n = len(rollout.texts)
    advantages = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    rows = torch.arange(rank * n // world, (rank + 1) * n // world)
    model = gen
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(gen)
    with torch.no_grad():
        old = completion_logprobs(gen, rollout, 1.0, rows=rows)
    logp = completion_logprobs(model, rollout, 1.0, rows=rows)
    loss, _ = policy_loss(logp, old, advantages[rows], rollout.completion_mask[rows], 0.2)
    loss.backward()
    return [p.grad.clone() for p in gen.parameters() if p.grad is not None]


def _local(data, rank: int, world: int):
    n = len(data) // world
    sl = slice(rank * n, (rank + 1) * n)
    return type(data)(data.input_ids[sl], data.attention_mask[sl], data.labels[sl])


def _inner(case: str, micro: int | None = None) -> InnerConfig:
    backend, shuffle, batch, optim = {**CASES, **MICRO_CASES}[case]
    return InnerConfig(optim=optim, batch_size=batch, backend=backend, shuffle=shuffle,
                       micro_batch_size=micro)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target, data, phi = _setup()
        info = world_info()
        local = _local(data, rank, world)
        results = {}
        for case in [*CASES, *MICRO_CASES]:
            cfg = _inner(case, 1 if case in MICRO_CASES else None)
            order = rank_order(len(local), cfg.batch_size, cfg.shuffle, SEED, "shared", info)
            attributed = metagradient_rewards(target, local, phi, cfg, order)
            results[case] = {
                "rewards": all_gather_cat(attributed.rewards, info),
                "phi": attributed.phi,
                "losses": torch.stack(attributed.losses),
                "num_examples": order.num_examples,
            }
        cfg = _inner("func_shuffled_sgd")
        order = rank_order(len(local), cfg.batch_size, cfg.shuffle, SEED, "shared", info)
        results["dataset_phi"] = dataset_reward(target, local, phi, cfg, order).phi
        # negative control: independent SFTs on half the data give other rewards
        order = rank_order(len(local), cfg.batch_size, cfg.shuffle, SEED, "independent", info)
        results["independent"] = all_gather_cat(
            metagradient_rewards(target, local, phi, cfg, order).rewards, info
        )
        results["policy_grads"] = _policy_grads(rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
        yield [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_shared_sft_rewards_match_single_process(two_rank_results, case):
    target, data, phi = _setup()
    cfg = _inner(case)
    single = WorldInfo()
    out = metagradient_rewards(
        target, data, phi, cfg, rank_order(N, cfg.batch_size, cfg.shuffle, SEED, "shared", single)
    )
    rewards, value, losses = out.rewards, out.phi, out.losses
    assert rewards.abs().max() > 0
    for rank in range(2):
        got = two_rank_results[rank][case]
        assert got["num_examples"] == N
        tiny = 1e-12 * float(rewards.abs().max())
        torch.testing.assert_close(got["rewards"], rewards, rtol=1e-6, atol=tiny)
        torch.testing.assert_close(got["phi"], value, rtol=1e-9, atol=0)
        torch.testing.assert_close(got["losses"], torch.stack(losses), rtol=1e-9, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MICRO_CASES))
def test_micro_batched_shared_sft_equals_the_unsplit_one(two_rank_results, case):
    target, data, phi = _setup()
    cfg = _inner(case)  # unsplit, one process
    order = rank_order(N, cfg.batch_size, cfg.shuffle, SEED, "shared", WorldInfo())
    out = metagradient_rewards(target, data, phi, cfg, order)
    rewards, value, losses = out.rewards, out.phi, out.losses
    for rank in range(2):
        got = two_rank_results[rank][case]
        scale = float(rewards.abs().max())
        assert float((got["rewards"] - rewards).abs().max()) <= 1e-10 * scale
        assert abs(float(got["phi"] - value)) <= 1e-10 * abs(float(value))
        assert float((got["losses"] - torch.stack(losses)).abs().max()) <= 1e-10


@pytest.mark.slow
def test_shared_plain_sft_matches_single_process(two_rank_results):
    target, data, phi = _setup()
    cfg = _inner("func_shuffled_sgd")
    order = rank_order(N, cfg.batch_size, cfg.shuffle, SEED, "shared", WorldInfo())
    value = dataset_reward(target, data, phi, cfg, order).phi
    for rank in range(2):
        torch.testing.assert_close(two_rank_results[rank]["dataset_phi"], value, rtol=1e-9, atol=0)


@pytest.mark.slow
def test_generator_update_matches_single_process(two_rank_results):
    """DDP's average of the ranks' policy-loss gradients (equal examples per rank, global
    advantages) is the single-process gradient on all examples: the same generator update."""
    single = _policy_grads()
    assert any(bool(s.abs().max() > 0) for s in single)
    for rank in range(2):
        got = two_rank_results[rank]["policy_grads"]
        assert len(got) == len(single)
        for g, s in zip(got, single, strict=True):
            torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-9 * float(s.abs().max()))


@pytest.mark.slow
def test_independent_sfts_differ_from_the_shared_one(two_rank_results):
    shared = two_rank_results[0]["func_shuffled_sgd"]["rewards"]
    independent = two_rank_results[0]["independent"]
    assert not torch.allclose(shared, independent, rtol=1e-3)


def test_shard_order_keeps_global_batch_sizes():
    order = [torch.tensor([5, 0, 3]), torch.tensor([7, 6]), torch.tensor([1, 2, 4])]
    assert [b.tolist() for b in shard_order(order, 0, 4)] == [[-1, 0, 3], [-1, -1], [1, 2, -1]]
    assert [b.tolist() for b in shard_order(order, 1, 4)] == [[1, -1, -1], [3, 2], [-1, -1, 0]]


def test_independent_mode_is_local():
    order = rank_order(8, 3, True, 0, "independent", WorldInfo(1, 4))
    assert order.grad_reduce is None and order.num_examples == 8
    assert sorted(torch.cat(order.batches).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="`distributed`.*shared | independent"):
        rank_order(8, 3, True, 0, "both", WorldInfo())  # type: ignore[arg-type]


def test_slurm_launch_checks(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    check_slurm_launch(1, 1)  # outside Slurm: nothing to check
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NAME", "dpg")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    with pytest.raises(ValueError, match="srun"):
        check_slurm_launch(2, 2)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    check_slurm_launch(2, 2)
    with pytest.raises(ValueError, match="num_nodes` is 1 .* 2 node"):
        check_slurm_launch(1, 2)
    with pytest.raises(ValueError, match="devices` is 4 .* 2 task"):
        check_slurm_launch(2, 4)
