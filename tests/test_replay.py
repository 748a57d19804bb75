"""The ``replay`` backend computes the same rewards as ``higher`` (and as finite differences).

Float64 throughout, so any disagreement above rounding is a bug in the step-wise adjoint
(a missing optimizer-state adjoint, a wrong Adam step count after recompute, a tied weight
swapped in once instead of everywhere), not noise. The bound asserted is 1e-6 relative (measured:
0 to ~2e-15). Checkpoint policies run on 4 inner steps with ``k = 3`` so that segments are uneven
([0, 3) and [3, 4)) and ``sqrt`` recomputes (k = 2); on CPU memory and on disk.
"""

from __future__ import annotations

import os
import time
import weakref

import pytest
import torch

from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import (
    InnerConfig,
    RankOrder,
    ReplayConfig,
    inner_order,
    metagradient_rewards,
    replay,
    replay_storage,
)
from dpg_lightning.inner.replay_storage import check_replay_storage, checkpoint_steps
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import OPTIMS, finite_difference_rewards, relative_error, tiny

TEXTS = ["hello world", "abc", "the cat sat", "zz top", "qwerty!", "a", "dpg", "x y"]
POLICIES = [("every", "cpu"), ("every", "disk"), ("every_k", "cpu"), ("every_k", "disk")]
POLICIES += [("sqrt", "cpu"), ("sqrt", "disk")]
# (policy, storage, offload_adjoint): the offloaded adjoint is exercised on both storages.
POLICIES = [(p, s, False) for p, s in POLICIES] + [("every", "disk", True), ("sqrt", "cpu", True)]


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny-model tests on one intra-op thread, restoring the setting afterwards.

    On a small box shared with other jobs, two OpenMP threads on tensors this small spend their
    time spinning on each other: measured 0.18 s with one thread vs 10 s with two for the same
    replay run under load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_replay_matches_higher(arch, optim, tokenizer, float64_llama, tmp_path):
    # gpt2: tied LM head (one named parameter in two places); llama: untied head.
    target = tiny(arch)
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, True, 0)  # 4 inner steps
    phi = LMHeadL2Norm()
    ref_cfg = InnerConfig(optim=OPTIMS[optim], batch_size=2, backend="higher")
    ref_out = metagradient_rewards(target, data, phi, ref_cfg, RankOrder(order))
    ref, ref_value, ref_losses = ref_out.rewards, ref_out.phi, ref_out.losses
    assert ref.abs().min() > 0  # every example matters, so the comparison is not vacuous
    for policy, storage, offload in POLICIES:
        rcfg = ReplayConfig(
            checkpoint=policy, k=3, storage=storage, directory=str(tmp_path),
            offload_adjoint=offload,
        )
        cfg = InnerConfig(optim=OPTIMS[optim], batch_size=2, backend="replay", replay=rcfg)
        out = metagradient_rewards(target, data, phi, cfg, RankOrder(order))
        rewards, value, losses = out.rewards, out.phi, out.losses
        rel = relative_error(rewards, ref)
        assert rel < 1e-6, f"{policy}/{storage}/offload={offload}: relative error {rel:.2e}"
        assert abs((value - ref_value) / ref_value) < 1e-12
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-12, atol=0)
        assert set(out.seconds) == {"inner_sft", "attribution"}
        assert os.listdir(tmp_path) == []  # checkpoint files are cleaned up


def test_replay_matches_finite_differences(tokenizer, float64_llama, tmp_path):
    target = tiny("llama")
    data = tokenize_examples(TEXTS[:4], tokenizer, 32)
    order = inner_order(len(data), 1, True, 3)  # 4 inner steps of one example
    phi = LMHeadL2Norm()
    rcfg = ReplayConfig(checkpoint="sqrt", storage="disk", directory=str(tmp_path))
    cfg = InnerConfig(optim=OPTIMS["adam"], batch_size=1, backend="replay", replay=rcfg)
    rewards = metagradient_rewards(target, data, phi, cfg, RankOrder(order)).rewards
    fd = finite_difference_rewards(target, data, phi, cfg, order)
    assert ((rewards - fd).abs() / fd.abs()).max() < 1e-4


def test_lm_head_only_replay(tokenizer, float64_llama):
    target = tiny("llama")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 3, True, 1)
    common = dict(optim=OPTIMS["adamw"], batch_size=3, train_params="lm_head")
    ref = metagradient_rewards(target, data, LMHeadL2Norm(), InnerConfig(**common),
                               RankOrder(order)).rewards
    # k > steps: a single checkpoint, the whole SFT recomputed as one segment.
    rcfg = ReplayConfig(checkpoint="every_k", k=10)
    cfg = InnerConfig(**common, backend="replay", replay=rcfg)
    rewards = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order)).rewards
    assert relative_error(rewards, ref) < 1e-6


def test_checkpoint_policies():
    assert checkpoint_steps(ReplayConfig("every"), 5) == [0, 1, 2, 3, 4]
    assert checkpoint_steps(ReplayConfig("every_k", k=2), 5) == [0, 2, 4]
    assert checkpoint_steps(ReplayConfig("sqrt"), 64) == list(range(0, 64, 8))
    assert checkpoint_steps(ReplayConfig("sqrt"), 1) == [0]
    with pytest.raises(ValueError, match=r"`k` is 0"):
        ReplayConfig("every_k", k=0)


def test_unwritable_directory_fails_before_the_run(tokenizer, tmp_path, monkeypatch):
    target = tiny("gpt2")
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 2, False, 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rcfg = ReplayConfig(storage="disk", directory=str(blocker / "checkpoints"))
    cfg = InnerConfig(batch_size=2, backend="replay", replay=rcfg)

    def no_sft(*args, **kwargs):
        raise AssertionError("the SFT started before the storage check")

    monkeypatch.setattr(replay, "_plain_step", no_sft)
    with pytest.raises(ValueError, match=r"not writable.*needs about .*4 checkpoint"):
        metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))


def test_full_disk_fails_with_the_estimate(tmp_path, monkeypatch):
    target = tiny("gpt2")
    cfg = InnerConfig(
        optim=OPTIMS["adam"],
        backend="replay",
        replay=ReplayConfig(storage="disk", directory=str(tmp_path)),
    )
    n_params = sum(p.numel() for p in target.parameters())
    expected = check_replay_storage(cfg, target, 96)
    # float64 params + Adam m and v, 96 stored states (the one before step 0 restores the target)
    assert expected == n_params * 8 * 3 * 96

    class Usage:
        free = expected // 2

    monkeypatch.setattr(replay_storage.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"free but .* needs about .*96 checkpoint"):
        check_replay_storage(cfg, target, 96)
    # sqrt(96) -> 10 stored checkpoints (+ a 9-state host buffer) fit in the same space.
    cfg.replay.checkpoint = "sqrt"
    assert check_replay_storage(cfg, target, 96) == n_params * 8 * 3 * (10 + 9)
    # An offloaded adjoint has a state's size; two are on disk at once (one read, one written).
    cfg.replay.offload_adjoint = True
    assert check_replay_storage(cfg, target, 96) == n_params * 8 * 3 * (10 + 2 + 9)


def _live_tensors(shape: torch.Size) -> dict[int, torch.Tensor]:
    """Live tensors shaped like ``shape``, by storage address (one entry per distinct buffer)."""
    import gc

    gc.collect()
    return {
        obj.untyped_storage().data_ptr(): obj
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and obj.shape == shape and obj.numel()
    }


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_reverse_pass_holds_one_state_and_one_adjoint(
    optim, offload, tokenizer, monkeypatch, tmp_path
):
    """Memory that does not grow with T means: entering every reverse step, the only copies of
    a weight are the adjoint (plus Adam's two working moments and, after the last step, their
    two adjoints), never an earlier step's adjoint, the final weights kept by a stale graph, or
    a reloaded state beside the target's own weights (the replayed state is loaded into those,
    so step 0 costs what every other step costs). Checkpoints on disk, so the store holds no
    tensor; with ``offload_adjoint`` the adjoint is on disk too, so only Adam's moments are
    left, the same at every step."""
    target = tiny("gpt2")
    weight = target.get_output_embeddings().weight
    data = tokenize_examples(TEXTS, tokenizer, 16)
    order = inner_order(len(data), 2, False, 0)  # 4 inner steps
    # Buffers alive before the call (the weight itself, other tests' leftovers) are held here,
    # so their addresses cannot be reused, and left out of the counts.
    before = _live_tensors(weight.shape)
    seen: list[int] = []
    inner_step = replay._reverse_step

    def counting(*args, **kwargs):
        seen.append(len(_live_tensors(weight.shape).keys() - before.keys()))
        return inner_step(*args, **kwargs)

    start_adjoint = replay_storage.Store.start_adjoint

    def start_written(store):
        # The background write holds an offloaded part until it is on disk; count after that.
        keep = start_adjoint(store)

        def keep_written(x):
            fetch = keep(x)
            store.wait()
            return fetch

        return keep_written

    monkeypatch.setattr(replay, "_reverse_step", counting)
    monkeypatch.setattr(replay_storage.Store, "start_adjoint", start_written)
    replay_cfg = ReplayConfig(storage="disk", directory=str(tmp_path), offload_adjoint=offload)
    cfg = InnerConfig(optim=OPTIMS[optim], batch_size=2, backend="replay", replay=replay_cfg)
    metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
    # Entering the last step only the weights have an adjoint (Phi reads no moment); from then
    # on the moments have one too. Adam's moments themselves are two working buffers.
    if offload:
        assert seen == [0 if optim == "sgd" else 2] * len(order), seen
    elif optim == "sgd":
        assert seen == [1] * len(order), seen
    else:
        assert seen == [2 + 1] + [2 + 3] * (len(order) - 1), seen


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_offloaded_adjoint_parts_leave_memory_at_once(optim, tokenizer, monkeypatch, tmp_path):
    """With ``offload_adjoint`` every finished part of the new adjoint is out of memory once it
    is written: a moment's during the backward (the hook drops autograd's ``.grad``), so a step
    never holds the adjoint it is building next to its graph. Counted at each hand-over: how
    many earlier parts of the same adjoint are still alive."""
    target = tiny("gpt2")
    data = tokenize_examples(TEXTS, tokenizer, 16)
    order = inner_order(len(data), 2, False, 0)
    start_adjoint = replay_storage.Store.start_adjoint
    alive: list[int] = []

    def start_tracking(store):
        keep, refs = start_adjoint(store), []

        def tracking(x):
            alive.append(sum(ref() is not None for ref in refs))
            fetch = keep(x)
            store.wait()  # written: the writer has let go of it
            refs.append(weakref.ref(x))
            return fetch

        return tracking

    monkeypatch.setattr(replay_storage.Store, "start_adjoint", start_tracking)
    rcfg = ReplayConfig(storage="disk", directory=str(tmp_path), offload_adjoint=True)
    cfg = InnerConfig(optim=OPTIMS[optim], batch_size=2, backend="replay", replay=rcfg)
    metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
    n_params = len(list(target.parameters()))
    assert len(alive) > 2 * n_params and max(alive) == 0, alive


@pytest.mark.parametrize("storage, offload", [("cpu", False), ("disk", False), ("disk", True)])
def test_target_weights_restored_bit_for_bit(storage, offload, tokenizer, monkeypatch, tmp_path):
    """The replay works in the target's own weights; after the call, and after a call that
    fails half-way through the reverse pass, they hold exactly their original values."""
    target = tiny("gpt2")
    original = {n: p.detach().clone() for n, p in target.named_parameters()}
    data = tokenize_examples(TEXTS, tokenizer, 16)
    order = inner_order(len(data), 2, False, 0)
    rcfg = ReplayConfig(
        checkpoint="every_k", k=3, storage=storage, directory=str(tmp_path),
        offload_adjoint=offload,
    )
    cfg = InnerConfig(optim=OPTIMS["adam"], batch_size=2, backend="replay", replay=rcfg)

    def unchanged() -> bool:
        return all(torch.equal(p, original[n]) for n, p in target.named_parameters())

    rewards = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order)).rewards
    assert rewards.abs().sum() > 0 and unchanged()
    calls = []
    inner_step = replay._reverse_step

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2: the weights hold state 2 by now
            raise RuntimeError("killed")
        return inner_step(*args, **kwargs)

    monkeypatch.setattr(replay, "_reverse_step", failing)
    with pytest.raises(RuntimeError, match="killed"):
        metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
    assert unchanged()
    assert not os.listdir(tmp_path)  # checkpoint files removed either way


def test_background_write_finishes_before_the_update(tokenizer, monkeypatch, tmp_path):
    """Disk checkpoints are written while the next gradient is computed from the same
    tensors; a slow disk must not let the in-place update overwrite them mid-write (the saved
    state would then be the next one). Same rewards, bit for bit, as host-memory storage."""
    target = tiny("gpt2")
    data = tokenize_examples(TEXTS, tokenizer, 16)
    order = inner_order(len(data), 2, False, 0)

    def run(storage: str) -> torch.Tensor:
        rcfg = ReplayConfig(storage=storage, directory=str(tmp_path))
        cfg = InnerConfig(optim=OPTIMS["adam"], batch_size=2, backend="replay", replay=rcfg)
        return metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order)).rewards

    in_memory = run("cpu")
    write = replay_storage._write

    def slow_write(path, tensors):
        time.sleep(0.2)
        write(path, tensors)

    monkeypatch.setattr(replay_storage, "_write", slow_write)
    assert torch.equal(run("disk"), in_memory)
