"""The LightningModule: one DPG step = rollout, differentiable inner SFT, rewards, policy update.

The module only orchestrates; the math lives in plain functions (``inner``, ``advantages``,
``policy``, ``rollout``). It holds three models: the trainable ``generator``; the ``target`` at
its *initial* weights (frozen, never trained in place: every step's SFT starts from it); and,
when ``policy.beta > 0``, a frozen ``reference`` copy of the initial generator.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
from torch import Tensor

from dpg_lightning.common.errors import ConfigError, check_int_at_least, require
from dpg_lightning.common.seeds import derive_seed
from dpg_lightning.common.settings import check_literal_args
from dpg_lightning.common.warn import warn
from dpg_lightning.dpg.lr_schedule import generator_optimizers
from dpg_lightning.dpg.minibatches import minibatch_count, minibatch_rows
from dpg_lightning.dpg.policy import PolicyConfig, accumulate_policy_loss
from dpg_lightning.dpg.rewards import make_rewarder
from dpg_lightning.dpg.rollout import (
    Rollout,
    SamplingConfig,
    completion_logprobs,
    sample_rollout,
    uses_chat_template,
)
from dpg_lightning.dpg.setting_warnings import setting_warnings
from dpg_lightning.dpg.step import (
    StepScore,
    attribution_for,
    score_by_example_reward,
    score_step,
    sft_jobs,
)
from dpg_lightning.dpg.step_output import StepOutput
from dpg_lightning.example_rewards.base import (
    ExampleReward,
    check_example_reward,
    reference_texts_of,
)
from dpg_lightning.inner import InnerConfig, MetricFn, SFTSet, sft_on_texts, trainable_names
from dpg_lightning.inner.shared_sft import WorldInfo, all_gather_cat, world_info
from dpg_lightning.metrics.base import Metric, check_metric
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer
from dpg_lightning.models.pretrain import maybe_pretrain
from dpg_lightning.run.checkpoint_config import check_checkpoint_config
from dpg_lightning.run.divergence import DivergenceGuard, StepNumbers
from dpg_lightning.run.model_summary import parameter_summary
from dpg_lightning.run.progress import PhaseReporter, phase_progress_bar
from dpg_lightning.run.slurm import check_slurm_launch
from dpg_lightning.run.stopping import GracefulShutdown, SlurmRequeue
from dpg_lightning.run.summary import RunSummary, logger_step, record_validation
from dpg_lightning.run.wandb_run import RememberWandbRun


class DPGModule(L.LightningModule):
    """Dataset Policy Gradient: train ``generator`` so SFT on its samples raises ``metric``.

    Args:
        generator: the policy LM (trainable).
        target: the LM fine-tuned in the inner loop (built once, kept at initial weights).
        metric: ``Phi(target) -> scalar``, higher is better (default: ``LMHeadL2Norm``).
        inner: inner SFT settings (optimizer, batch size, trained parameters, backend).
        sampling: rollout settings (``samples_per_prompt``, temperature, top-p, length).
        policy: advantage and generator-update settings.
        reward: ``dpg`` (per-example metagradient) or ``dataset`` (every example gets
            ``Phi(SFT(D))``: the naive dataset-level RL baseline).
        seed: base seed of the inner shuffles, of each step's sampling RNG (re-seeded every
            step from ``(seed, step, rank)``, which makes resumes exact) and of validation.
        distributed: with several ranks, ``shared`` (default) runs ONE inner SFT over all
            ranks' examples (exact rewards; gradients all-reduced inside the differentiable
            loop); ``independent`` gives each rank its own SFT on its own examples (an
            approximation, no inner communication). See :mod:`dpg_lightning.inner.shared_sft`.
        max_nonfinite_steps: consecutive training steps with non-finite rewards, Phi or inner
            loss after which the run stops with an error (a single one is skipped). A
            non-finite validation Phi stops the run at once.
        val_sampling: how validation samples (``None``: as training). The paper samples one
            completion per validation prompt, greedily (``temperature: 0``) for the UUID.
        sft_groups: ``all`` (one inner SFT over the step's set) or ``inverse``: the set split
            into ``samples_per_prompt`` groups, the k-th sample of every prompt, each with its
            own SFT (the paper's naive baseline with ``reward: dataset``, and its "no
            cross-group batching" ablation with ``reward: dpg``); see ``dpg_lightning.dpg.step``.
    """

    def __init__(
        self,
        generator: ModelConfig | None = None,
        target: ModelConfig | None = None,
        metric: Metric | None = None,
        inner: InnerConfig | None = None,
        sampling: SamplingConfig | None = None,
        policy: PolicyConfig | None = None,
        reward: Literal["dpg", "dataset", "example"] = "dpg",
        seed: int = 0,
        distributed: Literal["shared", "independent"] = "shared",
        max_nonfinite_steps: int = 5,
        val_sampling: SamplingConfig | None = None,
        sft_groups: Literal["all", "inverse"] = "all",
        example_reward: ExampleReward | None = None,
    ) -> None:
        super().__init__()
        check_slurm_launch()
        self.save_hyperparameters(ignore=["metric", "example_reward"])
        self.automatic_optimization = False
        self.gen_cfg = generator or ModelConfig()
        self.target_cfg = target or ModelConfig(seed=1)
        self.metric = metric or LMHeadL2Norm()
        self.inner = inner or InnerConfig()
        self.sampling = sampling or SamplingConfig()
        self.policy = policy or PolicyConfig()
        try:
            check_literal_args(DPGModule.__init__, reward=reward, distributed=distributed,
                               sft_groups=sft_groups)
        except ConfigError as err:
            raise err.at("model") from None
        check_int_at_least("model.seed", seed, 0)
        check_int_at_least("model.max_nonfinite_steps", max_nonfinite_steps, 1)
        require((reward == "example") == (example_reward is not None),
                "`model.example_reward` is set exactly when `model.reward: example`: give both "
                "(a per-example reward, no inner SFT per step) or neither")
        self.example_reward = example_reward
        require(self.sampling.temperature > 0,
                "`model.sampling.temperature` is 0 (greedy), but the policy gradient needs "
                "sampled rollouts; use a temperature > 0 (0 is for `model.val_sampling`)")
        self.val_sampling = val_sampling or self.sampling
        self.sft_groups = sft_groups
        self.reward, self.seed, self.distributed = reward, seed, distributed
        self.phases = PhaseReporter()  # where a step is, for the progress bar
        self.divergence = DivergenceGuard(max_nonfinite_steps, self._lower_hints(), self.inner)
        for message in setting_warnings(self.sampling, self.policy, self.gen_cfg):
            warn(message)

        self.gen_tokenizer = load_tokenizer(self.gen_cfg)
        uses_chat_template(self.gen_tokenizer, self.sampling)  # a template it needs is there
        if val_sampling is not None:
            uses_chat_template(self.gen_tokenizer, val_sampling)
        self.generator = build_model(self.gen_cfg, len(self.gen_tokenizer))
        # the generator reads prompts as rollouts feed them: with a start token only if the
        # chat template adds one
        maybe_pretrain(self.generator, self.gen_tokenizer, self.gen_cfg,
                       start_token=uses_chat_template(self.gen_tokenizer, self.sampling))
        self.target_tokenizer = load_tokenizer(self.target_cfg)
        self.target = build_model(self.target_cfg, len(self.target_tokenizer))
        maybe_pretrain(self.target, self.target_tokenizer, self.target_cfg)
        self.target.requires_grad_(False)
        self.checkpoint_step: int | None = None  # the DPG step of a loaded checkpoint
        self.reference = None
        # (a module for ``reward: dataset``: its moving average is checkpointed)
        self.rewarder = make_rewarder(reward, self.policy, sft_groups == "inverse")
        if self.policy.beta:
            self.reference = copy.deepcopy(self.generator).requires_grad_(False)
        self.metric.bind_tokenizer(self.target_tokenizer)
        self.metric.setup(self.target)
        self.phi_initial = check_metric(
            self.metric, self.target, trainable_names(self.target, self.inner.train_params)
        )
        if example_reward is not None:  # after bind_tokenizer: the metric's set is read
            check_example_reward(example_reward, self.target_tokenizer,
                                 reference_texts_of(self.metric))

    # ---------------------------------------------------------------- set-up

    def configure_optimizers(self) -> dict:
        """The generator's AdamW and lr schedule (checkpointed by Lightning with it)."""
        return generator_optimizers(self.generator.parameters(), self.policy,
                                    self.trainer.max_steps)

    def setup(self, stage: str) -> None:
        """Check the synthetic-set size against ``inner.batch_size`` before any long work."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if self._trainer:
            check_slurm_launch(self.trainer.num_nodes, self.trainer.num_devices)
        if dm is not None and hasattr(dm, "num_prompts"):
            shared = self.distributed == "shared" and self._trainer
            ranks = self.trainer.world_size if shared else 1
            self._sft_set(dm.num_prompts, ranks).batch(self.inner.batch_size)

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks every DPG run needs: Slurm auto-requeue and SIGTERM/SIGINT handling, both
        checkpointing between steps (``SlurmRequeue``, ``GracefulShutdown``), the W&B run id
        kept in the run directory for resumes (``RememberWandbRun``), the end-of-run summary
        (``RunSummary``) and, in place of Lightning's default bar and model table, a bar that
        shows the phase of the step and a table without Lightning's mode and FLOPs columns."""
        callbacks: list[L.Callback] = [
            SlurmRequeue(), GracefulShutdown(), RememberWandbRun(), RunSummary(),
        ]
        replaced = (phase_progress_bar(self.trainer.progress_bar_callback),
                    parameter_summary(self.trainer.callbacks))
        return callbacks + [callback for callback in replaced if callback is not None]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model (instead of a wall of shape mismatches), and
        keep its DPG step: ``validate`` logs at it (:func:`logger_step`)."""
        check_checkpoint_config(dict(self.hparams), checkpoint.get("hyper_parameters", {}))
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get("state_dict", {})
        if "dataset_baseline" in state:  # checkpoints before DatasetReward: (mean, var, count)
            for name, value in zip(("mean", "var", "count"), state.pop("dataset_baseline")):
                state[f"rewarder.baseline.{name}"] = value

    # ---------------------------------------------------------------- training

    def training_step(self, batch: list[str], batch_idx: int) -> dict[str, StepOutput]:
        """One DPG step: rollout, the step's SFTs scored, advantages, policy update, logs."""
        self.phases.phase("rollout")
        start = time.perf_counter()
        rollout = sample_rollout(self.generator, self.gen_tokenizer, batch, self.sampling)
        seconds = {"rollout": time.perf_counter() - start}
        world = world_info()
        score = self._score(rollout, world)
        rewards = score.rewards
        # Rewards of all ranks' examples (one SFT over them all when shared): the baselines and
        # the finiteness check must agree across ranks, or DDP's gradient sync would hang.
        all_rewards = all_gather_cat(rewards, world)
        # 0 when the ranks shared one SFT (all end with the same target), > 0 when independent.
        phis = all_gather_cat(_phi_or_nothing(score, rewards.dtype), world)
        self.log_dict(_sft_metrics(score, phis), batch_size=len(batch))
        if self._skip_if_nonfinite(all_rewards, phis, score.losses, len(batch)):
            step = StepOutput(rollout.texts, rollout.prompts, rewards.cpu())
        else:
            advantages = self.rewarder.advantages(
                rewards, all_rewards, world, self.distributed == "shared",
                self.sampling.samples_per_prompt, self.policy,
            )
            start = time.perf_counter()
            stats = self._update_policy(rollout, advantages.to(self.device))
            seconds = {**seconds, **score.seconds, "policy_update": time.perf_counter() - start}
            self._log_step(rollout, rewards, score.phi, stats, seconds, len(batch))
            step = StepOutput(rollout.texts, rollout.prompts, rewards.cpu(), advantages.cpu())
        self._log_dpg_step(len(batch))
        return step.as_lightning_output()

    def _log_dpg_step(self, batch_size: int) -> None:
        """End a DPG step, updated or skipped: its lr logged, the lr schedule stepped (once per
        DPG step), and its metrics logged at the DPG steps done (1 for the first; the untrained
        validation is step 0), the number checkpoint names and the progress bar count. A
        logged ``step`` is Lightning's loggers' x-axis (else its count of batches before this
        one: one less); validation logs it too (:meth:`validation_step`)."""
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.lr_schedulers().step()
        self.log("step", float(self.global_step), batch_size=batch_size)

    def _sft_set(self, num_prompts: int, ranks: int) -> SFTSet:
        """A step's synthetic set on ``ranks`` ranks (one SFT's; see :class:`SFTSet`)."""
        return SFTSet(num_prompts, self.sampling.samples_per_prompt, ranks,
                      self.sft_groups == "inverse")

    def _score(self, rollout: Rollout, world: WorldInfo) -> StepScore:
        """The step's SFTs on this rank (ordered by the step), attributed and scored; or, with
        ``reward: example``, each example scored by the per-example reward alone."""
        if self.example_reward is not None:
            self.phases.phase("example reward")
            return score_by_example_reward(self.example_reward, rollout)
        data = self.inner.tokenize(rollout.texts, self.target_tokenizer).to(self.device)
        shared = self.distributed == "shared"
        sft_set = self._sft_set(len(data) // self.sampling.samples_per_prompt,
                                world.world_size if shared else 1)
        jobs = sft_jobs(sft_set, self.inner, self.seed, self.global_step, self.distributed, world)
        self.phases.phase("inner SFT")  # the backends count its steps as each one ends
        with self._target_precision():
            return score_step(attribution_for(self.reward), self.target, data, self.metric,
                              self.inner, jobs, self.phases.phase)

    def _skip_if_nonfinite(
        self, all_rewards: Tensor, phis: Tensor, losses: list[Tensor], batch_size: int
    ) -> bool:
        """Skip the update of a step with non-finite numbers (logged) rather than poison the
        generator; the divergence guard ends the run if this goes on."""
        step_losses = [torch.stack(losses)] if losses else []
        step = self.global_step + 1  # this DPG step, as its metrics and checkpoint count it
        problems = self.divergence.record_step(step, StepNumbers(all_rewards, phis, step_losses))
        if not problems:
            return False
        self.log("train/skipped_nonfinite", 1.0, batch_size=batch_size)
        warn(f"step {step}: non-finite {'; '.join(problems)}: policy update skipped")
        # An optimizer step with no gradients changes nothing but still counts the step, like
        # an update does (one per DPG step), so `trainer.max_steps` and checkpoints stay on
        # schedule.
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()
        return True

    def _log_step(
        self, rollout: Rollout, rewards: Tensor, phi: Tensor | None, stats: dict[str, Tensor],
        seconds: dict[str, float], batch_size: int,
    ) -> None:
        """The metrics of an updated step, and the progress bar's reward and Phi."""
        n_tok = rollout.completion_mask.sum().float()
        self.log_dict(
            {
                "train/reward_mean": rewards.mean().float(),
                "train/reward_std": rewards.std().float() if len(rewards) > 1 else 0.0,
                "train/completion_tokens": n_tok / len(rollout.texts),
                **{f"train/{k}": v for k, v in stats.items()},
                **{f"time/{k}": v for k, v in seconds.items()},
            },
            batch_size=batch_size,
        )
        self.log("reward", rewards.mean().float(), prog_bar=True, logger=False,
                 batch_size=batch_size)
        if phi is not None:
            self.log("phi", phi.float(), prog_bar=True, logger=False, batch_size=batch_size)

    def _update_policy(self, rollout, advantages: Tensor) -> dict[str, Tensor]:
        p, temp = self.policy, self.sampling.temperature
        with torch.no_grad():
            chunk = self.sampling.generation_batch_size
            old = completion_logprobs(self.generator, rollout, temp, batch_size=chunk)
            ref = (completion_logprobs(self.reference, rollout, temp, batch_size=chunk)
                   if self.reference else None)
        opt = self.optimizers()
        stats: dict[str, list[Tensor]] = {"policy_loss": [], "clip_frac": [], "kl": []}
        per_prompt = self.sampling.samples_per_prompt
        minibatches = minibatch_count(p, per_prompt, len(rollout.texts))
        opt_steps, total_steps = 0, p.num_iterations * minibatches
        self.phases.phase("policy update", 0, total_steps)
        for _ in range(p.num_iterations):
            for rows in minibatch_rows(p, per_prompt, len(rollout.texts), minibatches,
                                       self.device):
                opt.zero_grad()
                loss, s = accumulate_policy_loss(
                    lambda chunk: completion_logprobs(self.generator, rollout, temp, rows=chunk),
                    self.manual_backward,
                    rows,
                    old,
                    advantages,
                    rollout.completion_mask,
                    p.micro_batch_size,
                    ref,
                    epsilon=p.epsilon,
                    beta=p.beta,
                    dual_clip=p.dual_clip,
                    aggregation=p.loss_aggregation,
                )
                if p.max_grad_norm:
                    self.clip_gradients(
                        opt, gradient_clip_val=p.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                opt_steps += 1
                self._optimizer_step(opt, last=opt_steps == total_steps)
                self.phases.phase("policy update", opt_steps, total_steps)
                stats["policy_loss"].append(loss.detach())
                for k, v in s.items():
                    stats[k].append(v)
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def _optimizer_step(self, opt: LightningOptimizer, last: bool) -> None:
        """One PPO update, counted as a global step only if it is the step's ``last``.

        Lightning counts every ``LightningOptimizer.step()`` as a global step; counting only
        one per DPG step makes ``global_step`` (hence ``trainer.max_steps``, checkpoint and
        logging steps, the step seeds) count DPG steps, whatever ``num_iterations x
        num_minibatches`` is, and the same for a skipped step. The other updates run what
        ``LightningOptimizer.step()`` runs (the strategy's step, through the precision
        plugin), less the count.
        """
        if last:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=do_nothing_closure)

    # ---------------------------------------------------------------- validation

    def sft_on_texts(self, texts: list[str], phi: MetricFn) -> torch.Tensor:
        """``phi`` of the target after a plain inner SFT (this run's settings) on ``texts``:
        what this data teaches the target. Validation and observing callbacks use it."""
        with self._target_precision():
            return sft_on_texts(
                self.target, self.target_tokenizer, texts, phi, self.inner,
                derive_seed(self.seed, "validation"),
            )

    # ---------------------------------------------------------------- precision

    def _generator_precision(self):
        """The generator computes under the trainer's precision (``trainer.precision:
        bf16-mixed``: bf16 matmuls on fp32 master weights, optimizer state in fp32). Lightning
        applies it inside training and validation steps; this applies it elsewhere too (the
        validation before the first step), so every rollout is sampled the same way."""
        if self._trainer is None:
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    def _target_precision(self):
        """The inner SFT and the metric ignore the trainer's precision: their precision is
        ``inner.autocast`` alone (the metagradient is checked in full precision)."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def evaluate(self, prompts: list[str]) -> dict[str, float]:
        """Phi after plain SFT of a fresh target copy on a fresh sample of the generator.

        Sampling uses a fixed seed (common random numbers), so two evaluations differ only
        because the generator changed.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        self.phases.phase("validation: rollout")
        with torch.random.fork_rng(devices=devices), self._generator_precision():
            torch.manual_seed(derive_seed(self.seed, "validation"))
            rollout = sample_rollout(self.generator, self.gen_tokenizer, prompts,
                                     self.val_sampling)
        readout: dict[str, float] = {}

        def phi_and_readout(target):
            value = self.metric(target)
            readout.update(self.metric.readout(target))
            return value

        readout.update(self.metric.readout_samples(rollout.texts))

        with self._target_precision():
            phi = sft_on_texts(
                self.target, self.target_tokenizer, rollout.texts, phi_and_readout, self.inner,
                derive_seed(self.seed, "validation"),
                lambda name, done, total: self.phases.phase(f"validation: {name}", done, total),
            )
        return {
            "val/phi": float(phi),
            "val/phi_initial": self.phi_initial,
            **{f"val/{k}": v for k, v in readout.items()},
        }

    def validation_step(self, batch: list[str], batch_idx: int) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "validation runs a (plain) SFT and needs autograd: "
                "set `trainer.inference_mode: false`"
            )
        metrics = self.evaluate(batch)
        step = logger_step(self.trainer)
        self.divergence.check_validation_phi(metrics["val/phi"], step)
        self.log_dict({**metrics, "step": float(step)}, batch_size=len(batch))

    def on_train_batch_start(self, batch: list[str], batch_idx: int) -> None:
        """Re-seed the RNG from (seed, step, rank): exact resumes, distinct samples per rank.
        Stop first if the steps before this one diverged (their metrics are logged by now)."""
        self.divergence.raise_if_diverged()
        torch.manual_seed(derive_seed(self.seed, "sampling", self.global_step, world_info().rank))

    def on_train_end(self) -> None:
        self.divergence.raise_if_diverged()

    def on_train_batch_end(self, outputs: object, batch: list[str], batch_idx: int) -> None:
        """At the last step, stop: Lightning then validates (if this step had no validation
        scheduled), so every run ends with a final ``val/phi`` and a best checkpoint."""
        trainer = self.trainer
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def _lower_hints(self) -> list[tuple[str, object]]:
        """Settings a diverging run should lower, with their values (for error messages)."""
        hints: list[tuple[str, object]] = [("model.inner.optim.lr", self.inner.optim.lr)]
        if self.inner.autocast != "none":
            hints.append(("model.inner.autocast", self.inner.autocast))
        hints.append(("model.policy.lr", self.policy.lr))
        return hints

    def on_train_start(self) -> None:
        """Log validation Phi at step 0: every run's curve starts at the untrained generator."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.global_step == 0 and dm is not None and self.loggers:
            metrics = self.evaluate(next(iter(dm.val_dataloader())))
            self.divergence.check_validation_phi(metrics["val/phi"], 0)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
            record_validation(self.trainer, 0, metrics)


def _phi_or_nothing(score: StepScore, dtype: torch.dtype) -> Tensor:
    """This rank's Phi as a 1-element tensor to gather, or an empty one without an SFT."""
    if score.phi is None:
        return score.rewards.new_zeros(0, dtype=dtype)
    return score.phi.reshape(1).to(dtype)


def _sft_metrics(score: StepScore, phis: Tensor) -> dict[str, Tensor | float]:
    """What every step logs about its SFTs, updated or skipped (nothing without an SFT)."""
    if score.phi is None:
        return {}
    return {
        "train/phi_after_sft": score.phi.float(),
        "train/inner_loss_first": score.losses[0].float(),
        "train/inner_loss_last": score.losses[-1].float(),
        "train/sft_examples": float(score.num_examples),
        "train/phi_rank_spread": (phis.max() - phis.min()).float(),
    }
