"""``inner.micro_batch_size``: a step's gradient accumulated over micro-batches is the step's
gradient. Rewards, Phi and inner losses of a micro-batched SFT equal the unsplit SFT's, in
float64 to 1e-10 relative, for every backend and optimizer, with a last partial micro-batch
(batch 5 in micro-batches of 2: 2 + 2 + 1) and across 2 ranks sharing one SFT
(``tests/test_distributed.py``). ``replay`` rebuilds one micro-batch's graph at a time.
"""

from __future__ import annotations

import pytest
import torch

from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import (
    InnerConfig,
    RankOrder,
    ReplayConfig,
    inner_order,
    metagradient_rewards,
)
from dpg_lightning.inner.steps import micro_batches
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from tests.helpers import OPTIMS, relative_error, tiny

TEXTS = ["hello world", "abc", "the cat sat", "zz top", "qwerty!", "a", "dpg", "x y", "mb", "10"]
BACKENDS = [("higher", None), ("func", None), ("replay", ReplayConfig()),
            ("replay", ReplayConfig(checkpoint="sqrt", storage="disk", offload_adjoint=True))]



def test_micro_batches_split_only_this_ranks_examples():
    idx = torch.tensor([4, -1, 0, 2, -1, 7])
    assert [c.tolist() for c in micro_batches(idx, 2)] == [[4, 0], [2, 7]]
    assert [c.tolist() for c in micro_batches(idx, 3)] == [[4, 0, 2], [7]]
    assert micro_batches(idx, 4)[0] is idx and micro_batches(idx, None)[0] is idx


@pytest.mark.parametrize("optim", ["sgd", "sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("backend, replay", BACKENDS, ids=["higher", "func", "replay",
                                                           "replay_disk_offload"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_micro_batched_sft_equals_the_unsplit_one(arch, backend, replay, optim, tokenizer,
                                                 float64_llama, tmp_path):
    target = tiny(arch)
    data = tokenize_examples(TEXTS, tokenizer, 32)
    order = inner_order(len(data), 5, True, 3)  # 2 steps of 5: micro-batches 2 + 2 + 1
    replay = replay or ReplayConfig()
    if replay.storage == "disk":
        replay = ReplayConfig(replay.checkpoint, storage="disk", directory=str(tmp_path),
                              offload_adjoint=replay.offload_adjoint)

    def run(micro: int | None):
        cfg = InnerConfig(optim=OPTIMS[optim], batch_size=5, micro_batch_size=micro,
                          backend=backend, replay=replay)
        out = metagradient_rewards(target, data, LMHeadL2Norm(), cfg, RankOrder(order))
        return out.rewards, out.phi, out.losses

    whole, phi, losses = run(None)
    split, phi_split, losses_split = run(2)
    assert whole.abs().max() > 0
    assert relative_error(split, whole) < 1e-10
    assert relative_error(phi_split.reshape(1), phi.reshape(1)) < 1e-12
    assert relative_error(torch.stack(losses_split), torch.stack(losses)) < 1e-12
    # one micro-batch as large as the batch is the unsplit step, bit for bit
    same, _, _ = run(5)
    assert torch.equal(same, whole)
