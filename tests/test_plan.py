"""``python -m dpg_lightning plan``: plans every shipped config without a model, a GPU, the hub
or the prompt files; says which knob to turn when a step does not fit; and the memory/FLOP
model (:mod:`dpg_lightning.planning.cost`) scales the way the computation does.

The model's accuracy against measured peaks is ``benchmarks/plan_check.py``'s job (numbers in
``benchmarks/README.md``); these tests are fast and build no model.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from dpg_lightning.cli import main
from dpg_lightning.plan import parser
from dpg_lightning.planning.cost import (
    GiB,
    Inner,
    RolloutShape,
    inner_terms,
    step_flops,
)
from dpg_lightning.planning.estimate import estimate
from dpg_lightning.planning.inputs import PlanInputs, inputs_from_config
from dpg_lightning.planning.search import knobs
from dpg_lightning.planning.shapes import KNOWN_SHAPES, ModelShape

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("tiny/*.yaml")) + sorted(
    (ROOT / "configs").glob("paper/*.yaml")
)
#: A training node's host memory and node-local disk (GiB) for the paper configs' replay
#: checkpoints (without them a GPU config's node storage is not checked, only reported).
NODE = ["--host_memory", "2000", "--disk", "4000"]
KEY_LINES = ("one DPG step", "rollouts", "inner steps", "micro-batches", "peak memory per device",
             "peak:", "replay checkpoints", "FLOPs per rank")
#: What a "does not fit" message proposes, as a command-line override.
SUGGESTION = re.compile(r"`(model\.[\w.]+): ([^`]+)`")
GPT2 = KNOWN_SHAPES["openai-community/gpt2"]


def _inputs(argv: list[str]) -> PlanInputs:
    """The plan's inputs from ``plan``'s command line, as the command builds them."""
    args = parser().parse_args(argv)
    inputs, _ = inputs_from_config(args.as_dict(), gpus=args.gpus,
                                   prompt_tokens=args.prompt_tokens)
    return inputs


def _plan(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``python -m dpg_lightning plan ARGV``, in-process."""
    try:
        main(["plan", *argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plans_every_config_without_models_or_files(config, capsys):
    """Every shipped config plans (the paper's name hub models and data files absent here).
    One that does not fit exits 3 naming a setting, and that setting, applied, fixes it."""
    argv = ["--config", str(config), *(NODE if config.parent.name == "paper" else [])]
    code, out, err = _plan(argv, capsys)
    for line in KEY_LINES:
        assert line in out, (line, out)
    if config.parent.name == "tiny":
        assert code == 0 and "fits" in out, err
        return
    assert code in (0, 3), err
    if code == 3:
        key, value = SUGGESTION.search(err).groups()
        code, out, err = _plan([*argv, f"--{key}={value}"], capsys)
        assert code == 0, (key, value, err)


@pytest.mark.parametrize("gpus", [1, 8])
def test_paper_qr_counts_the_shared_set(gpus):
    cfg = _inputs(["--config", "configs/paper/qr.yaml", "--gpus", str(gpus)])
    plan = estimate(cfg)
    rows = cfg.num_prompts * cfg.sampling.samples_per_prompt
    assert plan.rows == rows and plan.set_size == rows * gpus
    assert plan.steps == math.ceil(rows * gpus / cfg.inner.batch_size)
    assert plan.inner.rows_per_step == min(rows, math.ceil(cfg.inner.batch_size / gpus))


def _tiny_replay(micro: int) -> list[str]:
    return [
        "--config", "configs/tiny/l2_norm.yaml", "--prompt_tokens", "8",
        "--model.target.hidden_size", "256", "--model.target.num_layers", "4",
        "--model.target.intermediate_size", "1024", "--data.num_prompts", "16",
        "--model.inner.backend", "replay", "--model.inner.batch_size", "32",
        "--model.inner.micro_batch_size", str(micro), "--disk", "100", "--host_memory", "100",
    ]


def test_a_micro_batch_that_cannot_fit_names_inner_micro_batch_size(capsys):
    peaks = {m: estimate(_inputs(_tiny_replay(m))).peak for m in (4, 32)}
    assert peaks[32][1] == "inner SFT" and peaks[32][0] > peaks[4][0]
    memory = (peaks[4][0] + peaks[32][0]) / 2 / GiB
    code, out, err = _plan([*_tiny_replay(32), "--gpu_memory", f"{memory:.6f}"], capsys)
    assert code == 3 and "DOES NOT FIT" in out
    assert "`model.inner.micro_batch_size: " in err, err
    suggested = int(err.split("`model.inner.micro_batch_size: ")[1].split("`")[0])
    assert 4 <= suggested < 32
    code, _, err = _plan([*_tiny_replay(suggested), "--gpu_memory", f"{memory:.6f}"], capsys)
    assert code == 0, err


def test_checkpoints_that_exceed_the_disk_name_the_checkpoint_policy(capsys):
    code, _, err = _plan([*_tiny_replay(8), "--model.inner.replay.storage", "disk",
                          "--disk", "0.00001"], capsys)
    assert code == 3 and "model.inner.replay.checkpoint: sqrt" in err, err


def test_config_mistakes_exit_2_naming_the_key(capsys):
    code, _, err = _plan(["--config", "configs/paper/qr.yaml",
                          "--model.target.pretrained", "someone/unknown-model"], capsys)
    assert code == 2 and "--target_shape" in err and "someone/unknown-model" in err
    code, _, err = _plan(["--config", "configs/paper/qr.yaml", "--gpus", "0"], capsys)
    assert code == 2 and "--gpus" in err
    code, _, err = _plan(["--config", "configs/tiny/l2_norm.yaml",
                          "--model.inner.batch_size", "1000"], capsys)
    assert code == 2 and "model.inner.batch_size" in err


def test_a_shape_given_on_the_command_line_is_used(capsys):
    code, out, err = _plan([
        "--config", "configs/tiny/l2_norm.yaml", "--model.target.pretrained", "someone/unknown",
        "--target_shape", "arch=gpt2,vocab=50257,hidden=768,layers=12,heads=12,kv_heads=12,"
        "intermediate=3072,positions=1024,tied=true",
    ], capsys)
    assert code == 0, err
    assert "124.4 M params" in out


def test_rollout_and_policy_knobs():
    """Where the rollout or the policy update sets the peak, the knob is that phase's."""
    cfg = _inputs(["--config", "configs/tiny/l2_norm.yaml"])
    big = replace(
        cfg, gen=KNOWN_SHAPES["meta-llama/Llama-3.2-1B-Instruct"], num_prompts=64,
        sampling=replace(cfg.sampling, max_new_tokens=128, generation_batch_size=None),
    )
    policy_heavy = estimate(replace(big, policy=replace(cfg.policy, num_minibatches=1)))
    assert policy_heavy.peak[1] == "policy update"
    hint = knobs(policy_heavy, policy_heavy.peak[0] * 0.9)
    assert any("model.policy.num_minibatches" in k for k in hint), hint
    # first the knob that keeps the update: micro-batches accumulated into the same mini-batch
    assert "model.policy.micro_batch_size" in hint[0], hint
    micro = int(hint[0].split(": ")[1].split("`")[0])
    fixed = estimate(replace(policy_heavy.inputs, policy=replace(
        policy_heavy.inputs.policy, micro_batch_size=micro)))
    assert fixed.peak[0] <= policy_heavy.peak[0] * 0.9
    assert fixed.rollout.updates == policy_heavy.rollout.updates
    rollout_heavy = estimate(replace(big, policy=replace(cfg.policy, num_minibatches=256)))
    assert rollout_heavy.peak[1] == "rollout"
    hint = knobs(rollout_heavy, rollout_heavy.peak[0] * 0.9)
    assert any("model.sampling.generation_batch_size" in k for k in hint), hint


def test_known_shapes_have_the_public_parameter_counts():
    assert GPT2.params == 124_439_808  # GPT-2 small
    assert KNOWN_SHAPES["meta-llama/Llama-3.2-1B-Instruct"].params == 1_235_814_400


def _inner(backend: str, **kw) -> Inner:
    base = dict(backend=backend, optim="adamw", momentum=0.0, trained_bytes=GPT2.params * 4,
                steps=4, rows_per_step=16, rows_total=64, micro_rows=4, seq=128)
    return Inner(**{**base, **kw})


def _total(inner: Inner, shape: ModelShape = GPT2) -> int:
    return sum(b for _, b in inner_terms(shape, inner))


def test_replay_memory_grows_with_the_micro_batch_not_the_batch_or_steps():
    small, large = _total(_inner("replay", micro_rows=4)), _total(_inner("replay", micro_rows=8))
    assert large > small
    bigger_batch = _inner("replay", rows_per_step=64, rows_total=256, steps=4)
    more_steps = _inner("replay", steps=64, rows_total=1024)
    assert _total(bigger_batch) == small and _total(more_steps) == small
    offloaded = _total(_inner("replay", offload_adjoint=True))
    assert small - offloaded == 3 * GPT2.params * 4  # Adam: parameters + 2 moments


def test_unrolled_memory_grows_with_inner_steps():
    """higher/func keep every step: at a fixed set, more steps add each step's parameters and
    update graph (6 weight copies with AdamW); more rows add their graphs."""
    for backend in ("higher", "func"):
        four, eight = _total(_inner(backend)), _total(_inner(backend, steps=8))
        assert eight - four == 4 * 6 * GPT2.params * 4
        assert _total(_inner(backend, rows_total=128)) > four
    sgd = _total(_inner("higher", optim="sgd", steps=8)) - _total(_inner("higher", optim="sgd"))
    assert sgd == 4 * GPT2.params * 4  # SGD's update keeps nothing: one parameter version


def test_flops_scale_as_the_computation():
    gen = KNOWN_SHAPES["meta-llama/Llama-3.2-1B-Instruct"]
    r = RolloutShape(rows=64, prompt=256, new=128, chunk=64, minibatch=64, updates=1,
                     compute_bytes=2, reference=False)
    replay = step_flops(gen, GPT2, r, _inner("replay", micro_rows=16), 1, 0)
    tokens = 64 * 384
    assert replay.rollout == 2 * gen.matmul_params * tokens
    assert replay.scoring == replay.rollout
    assert replay.policy == 3 * replay.rollout
    assert step_flops(gen, GPT2, r, _inner("replay"), 2, 0).policy == 2 * replay.policy
    assert replay.inner_sft == 6 * GPT2.matmul_params * 64 * 128
    assert replay.attribution == 3 * replay.inner_sft  # one micro-batch per step
    micro = step_flops(gen, GPT2, r, _inner("replay", micro_rows=4), 1, 0)
    assert micro.attribution == 4 * replay.inner_sft  # + a graph-free pass per step
    recompute = step_flops(gen, GPT2, r, _inner("replay", micro_rows=16), 1, 2)
    assert recompute.attribution == 3.5 * replay.inner_sft  # 2 of 4 steps recomputed
    unrolled = step_flops(gen, GPT2, r, _inner("higher"), 1, 0)
    assert unrolled.attribution == 2 * unrolled.inner_sft
    doubled = step_flops(gen, GPT2, r, _inner("higher", rows_total=128, steps=8), 1, 0)
    assert doubled.inner_sft == 2 * unrolled.inner_sft
    with_ref = step_flops(gen, GPT2, replace(r, reference=True), _inner("higher"), 1, 0)
    assert with_ref.scoring == 2 * unrolled.scoring


def test_a_gpu_config_is_planned_for_its_node_not_this_machine(capsys, monkeypatch):
    """A GPU config's replay storage is the training node's: this machine's memory and disk
    (here: none at all) do not fail the plan unless ``--local`` says the run is here."""
    import dpg_lightning.plan as command
    from dpg_lightning.planning.machine import Capacity

    monkeypatch.setattr(command, "local_host_memory", lambda: Capacity(0, "available here"))
    monkeypatch.setattr(command, "local_free_disk", lambda _: Capacity(0, "free here"))
    qr = ["--config", "configs/paper/qr.yaml", "--gpus", "8"]
    code, out, err = _plan(qr, capsys)
    assert code == 0, err
    assert "--host_memory and --disk" in out and "--local" in out
    code, out, err = _plan([*qr, "--local", "true"], capsys)
    assert code == 3 and "available here" in err and "free here" in err, err
    assert "the training node's --host_memory" in err
    code, _, err = _plan([*qr, "--host_memory", "0.001"], capsys)
    assert code == 3 and "host memory" in err and "disk:" not in err, err
    # a CPU config runs where it is planned: this machine is checked
    code, _, err = _plan(["--config", "configs/tiny/l2_norm.yaml",
                          "--model.inner.backend", "replay"], capsys)
    assert code == 3 and "available here" in err, err


def test_a_plan_that_does_not_fit_says_so_one_problem_and_one_remedy_a_line(capsys):
    code, _, err = _plan([*_tiny_replay(8), "--model.inner.replay.storage", "disk",
                          "--model.inner.replay.checkpoint", "sqrt",
                          "--disk", "0.00001", "--host_memory", "0.00001"], capsys)
    assert code == 3, err
    lines = err.splitlines()
    assert [line.split(":")[0].strip() for line in lines if line.startswith("  ")
            and not line.startswith("    ")] == ["host memory", "disk"], err
    assert all(len(line) <= 110 for line in lines), err
    assert sum("`model.inner.replay.checkpoint" in line for line in lines) == 2, err


def test_the_run_time_counts_max_steps_as_dpg_steps(capsys):
    code, out, err = _plan(["--config", "configs/tiny/l2_norm.yaml", "--trainer.max_steps",
                            "7", "--model.policy.num_minibatches", "4"], capsys)
    assert code == 0, err
    assert "  the run        7 DPG steps (trainer.max_steps)" in out, out
