"""One DPG step's plan: counts, memory by phase, ``replay``'s checkpoints and time.

:func:`estimate` turns :class:`~dpg_lightning.planning.inputs.PlanInputs` into the numbers the
``plan`` command prints and checks; the terms themselves are
:mod:`dpg_lightning.planning.cost`'s. The synthetic set and the inner batch it allows follow
:class:`~dpg_lightning.inner.set_size.SFTSet`, the rule the module itself runs by, so a plan
refuses exactly the batch sizes ``fit`` refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.inner.replay_storage import checkpoint_steps
from dpg_lightning.inner.set_size import SFTSet
from dpg_lightning.planning.cost import (
    Inner,
    RolloutShape,
    checkpoint_bytes,
    generator_persistent,
    inner_terms,
    policy_update_bytes,
    rollout_bytes,
    slots,
    step_flops,
)
from dpg_lightning.planning.inputs import PlanInputs
from dpg_lightning.planning.machine import Machine


@dataclass
class Plan:
    """One step's numbers: counts, memory by phase (name -> items), checkpoints."""

    inputs: PlanInputs
    sft_set: SFTSet
    steps: int  # inner steps of one SFT
    inner: Inner
    rollout: RolloutShape
    persistent: list[tuple[str, int]]  # held through the whole step
    phases: dict[str, list[tuple[str, int]]]  # on top of ``persistent``, one phase at a time
    stored: int = 0  # replay checkpoints per rank
    host_buffer: int = 0  # replay's recompute buffer per rank, in host memory
    saved_states: int = 0

    @property
    def rows(self) -> int:
        """This rank's rollouts of the step."""
        return self.sft_set.per_rank

    @property
    def set_size(self) -> int:
        """The step's synthetic set, all SFTs together (all ranks' when shared)."""
        return self.sft_set.per_rank * self.sft_set.ranks

    @property
    def held(self) -> int:
        """Bytes held through the whole step."""
        return sum(b for _, b in self.persistent)

    @property
    def peak(self) -> tuple[int, str]:
        """Peak bytes and the phase that sets it."""
        phase = max(self.phases, key=lambda p: sum(b for _, b in self.phases[p]))
        return self.held + sum(b for _, b in self.phases[phase]), phase

    def replay_per_node(self, gpus_per_node: int) -> tuple[int, int]:
        """``replay``'s host memory and disk bytes on one node: its ranks' recompute buffers
        (and checkpoints kept in host memory), and its ranks' checkpoints on disk."""
        node = min(self.inputs.gpus, gpus_per_node)
        on_cpu = self.inputs.inner.replay.storage == "cpu"
        host = (self.host_buffer + self.stored * on_cpu) * node
        return host, 0 if on_cpu else self.stored * node


def estimate(inputs: PlanInputs) -> Plan:
    """The plan of one step of ``inputs``; raises ``ConfigError`` where ``fit`` would."""
    inner_cfg, sampling, policy = inputs.inner, inputs.sampling, inputs.policy
    sft_set = SFTSet(inputs.num_prompts, sampling.samples_per_prompt,
                     ranks=inputs.gpus if inputs.shared else 1,
                     inverse_groups=inputs.sft_groups == "inverse")
    try:
        batch = sft_set.batch(inner_cfg.batch_size)
    except ConfigError as err:
        raise err.at("model") from None
    rows, sft_rows = sft_set.per_rank, sft_set.per_rank // sft_set.count
    steps = math.ceil(sft_set.size / batch)
    per_step = min(sft_rows, math.ceil(batch / inputs.gpus) if inputs.shared else batch)
    target, gen = inputs.target, inputs.gen
    trained = (target.vocab * target.hidden if inner_cfg.train_params == "lm_head"
               else target.params) * target.bytes_per_param
    seq = inner_cfg.max_length
    if inputs.same_tokenizer:
        seq = min(seq, sampling.max_new_tokens + 2)
    inner = Inner(
        backend=inner_cfg.backend, optim=inner_cfg.optim.name, momentum=inner_cfg.optim.momentum,
        trained_bytes=trained, steps=steps, rows_per_step=per_step, rows_total=sft_rows,
        micro_rows=min(inner_cfg.micro_batch_size or per_step, per_step), seq=seq,
        offload_adjoint=inner_cfg.replay.offload_adjoint, reward=inputs.reward,
        shared=inputs.shared, sfts=sft_set.count,
    )
    updates = (policy.num_minibatches if policy.minibatch_prompts is None
               else math.ceil(inputs.num_prompts / policy.minibatch_prompts))
    rollout = RolloutShape(
        rows=rows, prompt=inputs.prompt_tokens, new=sampling.max_new_tokens,
        chunk=min(rows, sampling.generation_batch_size or rows),
        minibatch=math.ceil(rows / updates), updates=updates, micro=policy.micro_batch_size,
        compute_bytes=inputs.gen_compute_bytes, reference=policy.beta > 0,
    )
    persistent = generator_persistent(gen, rollout.reference)
    persistent.append(("target weights", target.params * target.bytes_per_param))
    phases = {
        "rollout": rollout_bytes(gen, rollout),
        "inner SFT": inner_terms(target, inner),
        "policy update": policy_update_bytes(gen, rollout),
    }
    plan = Plan(inputs, sft_set, steps, inner, rollout, persistent, phases)
    if inner.backend == "replay" and inputs.reward == "dpg":
        saved = checkpoint_steps(inner_cfg.replay, steps)
        segment = saved[1] - saved[0] if len(saved) > 1 else steps
        plan.saved_states = len(saved)
        plan.stored, plan.host_buffer = checkpoint_bytes(
            trained, slots(inner.optim, inner.momentum), len(saved), segment,
            inner.offload_adjoint,
        )
    return plan


@dataclass(frozen=True)
class PhaseTime:
    """One phase's FLOPs per rank and its time; ``bound`` when reading memory, not compute,
    sets the time (token-by-token decoding)."""

    name: str
    flops: float
    seconds: float
    bound: bool = False


def phase_times(plan: Plan, machine: Machine) -> list[PhaseTime]:
    """FLOPs per rank by phase and their time at the machine's throughput x MFU (fp32 phases
    at its fp32 rate); decoding takes at least the time to read the weights and the KV cache
    once per generated token."""
    inputs, r = plan.inputs, plan.rollout
    recompute = plan.steps - plan.saved_states if plan.saved_states else 0
    fl = step_flops(inputs.gen, inputs.target, r, plan.inner, inputs.policy.num_iterations,
                    recompute)
    gen_rate = machine.tflops if r.compute_bytes == 2 else machine.tflops_fp32
    half_target = inputs.target.bytes_per_param == 2 or inputs.inner.autocast == "bf16"
    target_rate = machine.tflops if half_target else machine.tflops_fp32
    gen = inputs.gen
    kv_per_token = 2 * gen.layers * gen.kv_heads * (gen.hidden // gen.heads)
    reads = math.ceil(r.rows / r.chunk) * r.new * (
        gen.params * gen.bytes_per_param
        + kv_per_token * (r.prompt + r.new / 2) * r.chunk * r.compute_bytes)
    times = []
    for name, flops, rate in (
        ("rollout (2P / token)", fl.rollout, gen_rate),
        ("scoring old/ref log-probs (2P / token)", fl.scoring, gen_rate),
        ("policy update (6P / token / iteration)", fl.policy, gen_rate),
        ("inner SFT (6P / target token)", fl.inner_sft, target_rate),
        ("attribution (reverse pass / backward)", fl.attribution, target_rate),
    ):
        seconds = flops / (rate * 1e12 * machine.mfu)
        if name.startswith("rollout"):
            memory_bound = reads / (machine.hbm_tbps * 1e12)
            if memory_bound > seconds:
                times.append(PhaseTime(name, flops, memory_bound, bound=True))
                continue
        times.append(PhaseTime(name, flops, seconds))
    return times
