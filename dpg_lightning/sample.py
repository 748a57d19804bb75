"""Use a trained generator: sample a synthetic dataset from it, or export it for transformers.

``python -m dpg_lightning sample --config CFG --ckpt_path CKPT --num_examples N --output F``
writes N ``{"prompt", "text"}`` rows to the JSONL file F (the dataset DPG trained the
generator to produce), and
``python -m dpg_lightning export --config CFG --ckpt_path CKPT --output DIR`` writes the
generator and its tokenizer with ``save_pretrained``, so it loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` outside this package.

Both read the training config (any LightningCLI config, including the ``config.yaml`` a run
saves; put ``--config`` first so later flags override it) but build only the generator: the
target and the objective are not needed to sample, and may be large. Any setting can be
overridden as in training, e.g. ``--model.sampling.temperature 0.7``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser, Namespace
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpg_lightning.common.errors import ConfigError, RunError
from dpg_lightning.common.settings import build_settings
from dpg_lightning.config_parser import run_config_parser
from dpg_lightning.data.prompts import load_prompts
from dpg_lightning.dpg.rollout import SamplingConfig, sample_rollout, uses_chat_template
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer
from dpg_lightning.run.checkpoint_config import check_checkpoint_config, plain
from dpg_lightning.run.checkpoint_files import unreadable
from dpg_lightning.run.preflight import check_ckpt_path, check_model_source


def _parser(command: str, description: str) -> ArgumentParser:
    parser = run_config_parser(command, description)
    parser.add_argument(
        "--ckpt_path", type=str | None, default=None,
        help="Lightning checkpoint of the DPG run (required; e.g. <run>/checkpoints/last.ckpt)",
    )
    parser.add_argument("--output", type=str, required=True, help="where to write")
    parser.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def _parse(parser: ArgumentParser, argv: list[str] | None) -> Namespace:
    """Parse, and report a missing checkpoint as a usage error rather than a traceback."""
    cfg = parser.parse_args(argv)
    if not cfg.ckpt_path:
        parser.error("`--ckpt_path` is required: the checkpoint of a DPG run (*.ckpt)")
    return cfg


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_generator(cfg: Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the generator of ``cfg.model`` and load its trained weights from ``cfg.ckpt_path``.

    The checkpoint must come from a run of this model (the same check as ``fit --ckpt_path``:
    one message naming what differs, not a wall of shape mismatches).
    """
    check_ckpt_path(cfg.ckpt_path)
    path = Path(cfg.ckpt_path)
    why = unreadable(path)
    if why is not None:
        raise ConfigError(f"`--ckpt_path {path}` cannot be read: {why}")
    # Lightning checkpoints pickle the hyperparameters (config dataclasses), so weights_only
    # loading would refuse them; mmap avoids reading the target and optimizer states at all.
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    prefix = "generator."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ConfigError(f"{path} holds no `generator.*` weights: is it a DPG checkpoint?")
    check_checkpoint_config(plain(cfg.model.as_dict()), plain(ckpt.get("hyper_parameters", {})),
                            verb="loading")
    gen = cfg.model.generator
    gen_cfg = build_settings(ModelConfig, gen, at="model.generator")
    check_model_source(gen_cfg.pretrained, "model.generator.pretrained")
    tokenizer = load_tokenizer(gen_cfg)
    model = build_model(gen_cfg, len(tokenizer))
    model.load_state_dict(state)
    return model.eval(), tokenizer


def _sampling(cfg: Namespace) -> SamplingConfig:
    s = cfg.model.sampling
    return build_settings(SamplingConfig, s, at="model.sampling")


def sample_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingConfig,
    num_examples: int,
    prompts_per_batch: int,
    output: Path,
    progress: bool = True,
) -> int:
    """Write ``num_examples`` JSONL rows ``{"prompt", "text"}``; returns the rows written.

    Prompts are taken in file order, cycling, so every prompt is used equally often; each
    gets ``sampling.samples_per_prompt`` completions, exactly as during training.
    """
    if num_examples < 1 or prompts_per_batch < 1:
        raise ValueError("`--num_examples` and `--prompts_per_batch` must be >= 1")
    output.parent.mkdir(parents=True, exist_ok=True)
    written, cursor = 0, 0
    with output.open("w") as f, tqdm(
        total=num_examples, unit="ex", desc="sampling", disable=not progress
    ) as bar:
        while written < num_examples:
            left = num_examples - written
            n_prompts = min(prompts_per_batch, -(-left // sampling.samples_per_prompt))
            batch = [prompts[(cursor + i) % len(prompts)] for i in range(n_prompts)]
            cursor += n_prompts
            rollout = sample_rollout(model, tokenizer, batch, sampling)
            rows = list(zip(rollout.prompts, rollout.texts, strict=True))[:left]
            f.writelines(json.dumps({"prompt": p, "text": t}) + "\n" for p, t in rows)
            written += len(rows)
            bar.update(len(rows))
    return written


def sample_main(argv: list[str] | None = None) -> Path:
    """``python -m dpg_lightning sample``: write a synthetic dataset from a trained generator."""
    parser = _parser("sample", "Sample a synthetic dataset (JSONL) from a trained generator.")
    parser.add_argument("--num_examples", type=int, required=True, help="rows to write")
    parser.add_argument(
        "--prompts_per_batch", type=int | None, default=None,
        help="prompts per generate() call (default: data.num_prompts)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    cfg = _parse(parser, argv)
    device = _device(cfg.device)
    model, tokenizer = load_generator(cfg)
    # The training prompts exactly as training saw them (source, field, template); the chat
    # template is applied inside sample_rollout, as in training.
    prompts = load_prompts(**cfg.data.as_dict()).train
    sampling = _sampling(cfg)
    try:  # a chat setting this tokenizer cannot honour
        uses_chat_template(tokenizer, sampling)
    except ConfigError as err:
        raise err.at("model.sampling") from None
    torch.manual_seed(cfg.seed)
    output = Path(cfg.output)
    n = sample_dataset(
        model.to(device), tokenizer, prompts, sampling, cfg.num_examples,
        cfg.prompts_per_batch or cfg.data.num_prompts, output,
    )
    print(f"wrote {n} examples to {output}", flush=True)
    return output


def export_main(argv: list[str] | None = None) -> Path:
    """``python -m dpg_lightning export``: write the trained generator with ``save_pretrained``.

    The generation config is set to the run's sampling settings, so ``generate()`` on the
    exported model samples from the policy DPG trained (pure temperature / top-p sampling).
    """
    parser = _parser("export", "Export a trained generator in save_pretrained format.")
    cfg = _parse(parser, argv)
    model, tokenizer = load_generator(cfg)
    sampling = _sampling(cfg)
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_p = True, sampling.temperature, sampling.top_p
    gen.top_k, gen.max_new_tokens = 0, sampling.max_new_tokens
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"`--output {output}` is an existing file; export writes a directory (config, "
            "weights, tokenizer): give a new or existing directory"
        )
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if not (output / "config.json").is_file():
        raise RunError(f"export wrote no config.json to {output}; nothing usable was exported")
    print(f"exported the generator to {output}", flush=True)
    return output
