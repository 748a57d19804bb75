"""``python -m dpg_lightning check-rewards``: do this run's rewards mean what DPG assumes?

DPG rewards example ``i`` with ``r_i = dPhi/deps_i`` at ``eps = 1``: the first-order estimate of
its leave-one-out effect ``Phi(D) - Phi(D with eps_i = 0)``. Whether that estimate holds depends
on the inner optimizer, its lr and its number of steps (and on the backend: ``first_order``
drops second-order terms on purpose), so it is a property of a *config*, not of the method; a
user changing the inner settings should be able to see it. This command samples the synthetic
set of one training step from the generator (a checkpoint's, or the initial one), computes its
rewards exactly as that step would (same prompts, sampling seed, inner order, backend and
dtype), then for ``K`` examples the exact leave-one-out difference by re-running the plain SFT
on a float64 copy of the target (:mod:`dpg_lightning.analysis.leave_one_out`), and reports how
the two agree (:mod:`dpg_lightning.analysis.agreement`), with the rounding floor below which a
leave-one-out difference is noise.

``python -m dpg_lightning check-rewards --config CFG [--ckpt_path CKPT] --num_examples K
--output FILE.json [--variant remove]`` prints a short table and writes the per-example arrays,
the statistics and the settings to ``FILE.json`` and a scatter plot to ``FILE.png``. The same
check runs during fit as the opt-in callback ``callbacks.reward_check.RewardCheck``; both call
:func:`check_step_rewards`.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import ArgumentParser, Namespace
from torch import Tensor

from dpg_lightning.analysis.agreement import Agreement, agreement, scatter_figure, write_report
from dpg_lightning.analysis.leave_one_out import LeaveOneOut, Variant, leave_one_out
from dpg_lightning.common.errors import ConfigError
from dpg_lightning.common.seeds import derive_seed
from dpg_lightning.common.settings import check_init_settings
from dpg_lightning.config_parser import run_config_parser
from dpg_lightning.data.prompts import PromptStream
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.dpg.rollout import sample_rollout
from dpg_lightning.dpg.step import sft_jobs
from dpg_lightning.inner.attribution import metagradient_rewards
from dpg_lightning.inner.set_size import SFTSet
from dpg_lightning.inner.shared_sft import WorldInfo
from dpg_lightning.module import DPGModule
from dpg_lightning.run.preflight import check_model_source
from dpg_lightning.sample import load_generator

#: The statistics the callback logs, by their ``Agreement`` field.
LOGGED = {
    "pearson": "pearson",
    "spearman": "spearman",
    "sign_agreement": "sign_agreement",
    "rel_error": "relative_error",
}


@dataclass(frozen=True)
class RewardCheckResult:
    """One step's rewards against their exact leave-one-out effects.

    Attributes:
        rewards: ``r_i`` of the checked examples, ``[K]``, as the step computes them.
        leave_one_out: their exact differences, rounding floor included.
        stats: the agreement of ``rewards`` (estimate) with the differences (reference).
        all_rewards: every example's reward, ``[n]``.
        phi: ``Phi`` after the step's SFT, in the target's own dtype.
        inner_steps: steps of the step's inner SFT.
        texts: the synthetic set.
        seconds: wall time of the rewards (``rewards``) and of the leave-one-out SFTs
            (``leave_one_out``).
    """

    rewards: Tensor
    leave_one_out: LeaveOneOut
    stats: Agreement
    all_rewards: Tensor
    phi: float
    inner_steps: int
    texts: list[str]
    seconds: dict[str, float]

    @property
    def below_floor(self) -> int:
        """Checked examples whose leave-one-out difference is within rounding noise."""
        return int((self.leave_one_out.differences.abs() <= self.leave_one_out.floor).sum())

    def metrics(self, prefix: str = "val/reward_loo_") -> dict[str, float]:
        """The logged statistics (``val/reward_loo_pearson``, ...)."""
        return {prefix + key: float(getattr(self.stats, field)) for key, field in LOGGED.items()}


def checked_indices(n: int, num_examples: int) -> Tensor:
    """``num_examples`` rows spread evenly over the set (rows are prompt-major, so a subset
    covers every prompt rather than the first few); all rows when ``num_examples == n``."""
    return torch.linspace(0, n - 1, num_examples).round().long()


def step_prompts(prompts: list[str], num_prompts: int, data_seed: int, step: int,
                 rank: int = 0, world_size: int = 1) -> list[str]:
    """The prompts training step ``step`` draws on ``rank`` (the datamodule's stream)."""
    return PromptStream(prompts, num_prompts, data_seed, 0, rank, world_size).batch(step)


def sample_step_set(module: DPGModule, prompts: list[str], step: int, rank: int = 0) -> list[str]:
    """The synthetic set training step ``step`` samples from ``prompts`` (its sampling seed),
    drawn without disturbing the caller's random state."""
    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(module.seed, "sampling", step, rank))
        rollout = sample_rollout(module.generator, module.gen_tokenizer, prompts,
                                 module.sampling)
    return rollout.texts


def check_step_rewards(
    module: DPGModule,
    texts: list[str],
    step: int,
    num_examples: int,
    variant: Variant = "zero_weight",
) -> RewardCheckResult:
    """Rewards of the set ``texts`` as step ``step`` computes them (its inner order, the
    configured backend, the target's dtype) against the exact leave-one-out differences of
    ``num_examples`` of them (float64 plain SFTs: ``num_examples + 2`` of them).

    The SFT is this process's alone (a single-rank order, no collectives), so a callback can
    run it on one rank of a multi-rank fit.
    """
    if module.example_reward is not None or module.sft_groups != "all":
        raise ConfigError(
            "check-rewards checks the metagradient of one SFT over the step's set; this config "
            "has `model.example_reward` or `model.sft_groups: inverse`: check it with "
            "`--model.sft_groups all` and no example reward"
        )
    data = module.inner.tokenize(texts, module.target_tokenizer).to(module.device)
    n = len(data)
    if not 2 <= num_examples <= n:
        raise ConfigError(
            f"`--num_examples {num_examples}` must be between 2 and the step's set size {n} "
            "(data.num_prompts x model.sampling.samples_per_prompt)"
        )
    spp = module.sampling.samples_per_prompt
    sft_set = SFTSet(n // spp, spp)
    (job,) = sft_jobs(sft_set, module.inner, module.seed, step, "independent", WorldInfo())
    indices = checked_indices(n, num_examples)
    # autograd on even inside a validation loop's no_grad; the target's precision is its own
    with torch.enable_grad(), torch.autocast(device_type=module.device.type, enabled=False):
        start = time.perf_counter()
        out = metagradient_rewards(module.target, data, module.metric, module.inner, job.order)
        middle = time.perf_counter()
        loo = leave_one_out(module.target, data, module.metric, module.inner, job.order.batches,
                            indices, variant, float64=True)
    seconds = {"rewards": middle - start, "leave_one_out": time.perf_counter() - middle}
    rewards = out.rewards.detach().double().cpu()
    return RewardCheckResult(
        rewards=rewards[indices], leave_one_out=loo,
        stats=agreement(rewards[indices], loo.differences), all_rewards=rewards,
        phi=float(out.phi), inner_steps=len(job.order.batches), texts=list(texts),
        seconds=seconds,
    )


def settings_of(module: DPGModule, result: RewardCheckResult) -> dict:
    """What the numbers depend on, for the JSON report."""
    inner, loo = module.inner, result.leave_one_out
    return {
        "backend": inner.backend, "optim": inner.optim.name, "lr": inner.optim.lr,
        "inner_batch_size": inner.batch_size, "inner_steps": result.inner_steps,
        "set_size": len(result.all_rewards), "num_examples": len(result.rewards),
        "indices": loo.indices.tolist(), "variant": loo.variant, "loo_dtype": loo.dtype,
        "floor": loo.floor, "reorder_noise": loo.reorder_noise, "ulp": loo.ulp,
        "below_floor": result.below_floor, "phi": result.phi, "phi_float64": loo.phi,
        "seed": module.seed, "seconds": result.seconds,
        "all_rewards": result.all_rewards.tolist(), "texts": result.texts,
        "torch": torch.__version__, "commit": _commit(),
    }


def table(result: RewardCheckResult) -> str:
    """The short table the command prints."""
    s, loo = result.stats, result.leave_one_out
    rows = [
        ("examples checked", f"{s.n} of {len(result.all_rewards)} ({loo.variant})"),
        ("Pearson", f"{s.pearson:.3f}"),
        ("Spearman", f"{s.spearman:.3f}"),
        ("slope LOO ~ s*r", f"{s.slope_origin:.3g}   (1: same scale)"),
        ("OLS slope, icpt", f"{s.slope:.3g}, {s.intercept:.3g}"),
        ("relative error", f"{s.relative_error:.3g}   (||r - LOO|| / ||LOO||)"),
        ("sign agreement", f"{s.sign_agreement:.3f}"),
        ("rounding floor", f"{loo.floor:.2g} ({loo.dtype}); {result.below_floor} of {s.n} "
                           f"|LOO| below it; min |LOO| {float(loo.differences.abs().min()):.2g}"),
        ("wall seconds", f"rewards {result.seconds['rewards']:.1f}, "
                         f"leave-one-out {result.seconds['leave_one_out']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def write_outputs(output: Path, module: DPGModule, result: RewardCheckResult,
                  extra: dict | None = None) -> tuple[Path, Path]:
    """``output`` (JSON: arrays, statistics, settings) and the scatter plot beside it."""
    settings = {**settings_of(module, result), **(extra or {})}
    write_report(output, result.rewards, result.leave_one_out.differences, result.stats,
                 settings)
    figure = output.with_suffix(".png")
    title = (f"{module.inner.backend}, {module.inner.optim.name} lr {module.inner.optim.lr}, "
             f"{result.inner_steps} steps: Pearson {result.stats.pearson:.3f}")
    scatter_figure(result.rewards, result.leave_one_out.differences, result.stats,
                   title=title).savefig(figure, dpi=120)
    return output, figure


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def parser() -> ArgumentParser:
    """The training config's parser plus this command's options."""
    p = run_config_parser(
        "check-rewards",
        "Compare a step's DPG rewards with exact leave-one-out effects (plain SFTs).",
    )
    p.add_argument("--ckpt_path", type=str | None, default=None,
                   help="checkpoint of a DPG run (default: the config's initial generator)")
    p.add_argument("--num_examples", type=int, required=True,
                   help="K: examples whose leave-one-out is computed (one SFT each)")
    p.add_argument("--output", type=str, required=True, help="the JSON report (plot: .png)")
    p.add_argument("--variant", type=str, default="zero_weight",
                   help="zero_weight (eps_i = 0, what r_i linearises) | remove (drop row i)")
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def build(p: ArgumentParser, cfg: Namespace) -> tuple[DPGModule, int]:
    """The module of ``cfg`` (its generator from ``--ckpt_path`` when given) and the step
    whose set is checked: the checkpoint's next step, else 0."""
    check_init_settings(DPGModule, cfg.model, "model")
    check_init_settings(PromptDataModule, cfg.data, "data")
    for role in ("generator", "target"):
        check_model_source((cfg.model.get(role) or {}).get("pretrained"),
                           f"model.{role}.pretrained")
    step, generator = 0, None
    if cfg.ckpt_path:
        generator, _ = load_generator(cfg)  # checks the file and that it is this model's
        ckpt = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        step = int(ckpt.get("global_step", 0))
    # ``instantiate`` from jsonargparse 4.49 on; ``instantiate_classes`` before (>= 4.32 allowed)
    init = getattr(p, "instantiate", None) or p.instantiate_classes
    init = init(cfg)
    module: DPGModule = init.model
    if generator is not None:
        module.generator.load_state_dict(generator.state_dict())
    return module, step


def main(argv: list[str] | None = None) -> RewardCheckResult:
    """``python -m dpg_lightning check-rewards``: print the agreement, write JSON and PNG."""
    p = parser()
    cfg = p.parse_args(argv)
    if cfg.variant not in ("zero_weight", "remove"):
        raise ConfigError(f"`--variant {cfg.variant}`: use zero_weight or remove")
    start = time.perf_counter()
    module, step = build(p, cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    module.to(device).eval()
    data = cfg.data
    train_prompts = PromptDataModule(**data.as_dict()).prompts
    prompts = step_prompts(train_prompts, data.num_prompts, data.seed, step)
    texts = sample_step_set(module, prompts, step)
    result = check_step_rewards(module, texts, step, cfg.num_examples, cfg.variant)
    extra = {"config": [str(c) for c in cfg.get("config") or []],
             "ckpt_path": cfg.ckpt_path, "step": step,
             "wall_seconds": time.perf_counter() - start}
    output, figure = write_outputs(Path(cfg.output), module, result, extra)
    inner = module.inner
    print(f"check-rewards at step {step}: backend {inner.backend}, {inner.optim.name} lr "
          f"{inner.optim.lr}, {result.inner_steps} inner steps of batch {inner.batch_size}",
          flush=True)
    print(table(result), flush=True)
    print(f"wrote {output} and {figure}", flush=True)
    return result
