"""Sampling completions from the generator and scoring their log-probabilities.

Prompts are left-padded so every completion starts at the same column; log-probabilities use
position ids derived from the attention mask (as ``generate`` does), at the sampling
temperature, so the policy being scored is the policy that sampled.

An Instruct generator (the paper's Llama-3.2-1B-Instruct) expects its chat format, so prompts
go through the tokenizer's chat template when it has one (:func:`format_prompts`, the one place
prompts become generator input, for training, validation and ``sample`` alike). Paper-scale
steps sample about 10^5 completions, which no single ``generate`` call holds in memory:
``generation_batch_size`` generates them in chunks and merges them into one :class:`Rollout`,
and ``completion_logprobs(batch_size=...)`` scores them in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg_lightning.common.errors import (
    ConfigError,
    check_int_at_least,
    check_positive,
    require,
)
from dpg_lightning.common.settings import Settings


@dataclass
class SamplingConfig(Settings):
    """Generation settings (``samples_per_prompt`` is TRL's ``num_generations``).

    Attributes:
        chat_template: ``auto`` wraps each prompt in the generator tokenizer's chat template
            when it has one (an Instruct model's), ``on`` requires one, ``off`` feeds prompts
            raw.
        system_prompt: a system message put before each prompt in the chat template (``None``:
            none); needs the chat template.
        generation_batch_size: at most this many rows (prompts x samples) per ``generate``
            call, and per no-grad scoring call; ``None`` does all in one.
    """

    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    chat_template: Literal["auto", "on", "off"] = "auto"
    system_prompt: str | None = None
    generation_batch_size: int | None = None

    def check(self) -> None:
        """Bounds and a system prompt that the chat template would use (``chat_template`` is
        checked from its annotation)."""
        check_int_at_least("samples_per_prompt", self.samples_per_prompt, 1)
        check_positive("temperature", self.temperature, allow_zero=True)
        require(0 < self.top_p <= 1, f"`top_p` is {self.top_p}; it must be in (0, 1]", "top_p")
        check_int_at_least("max_new_tokens", self.max_new_tokens, 1)
        require(
            self.system_prompt is None or isinstance(self.system_prompt, str),
            f"`system_prompt` is {self.system_prompt!r}; give a string or null",
            "system_prompt",
        )
        require(
            self.system_prompt is None or self.chat_template != "off",
            "`system_prompt` is set but `chat_template` is off, so it would be ignored; set "
            "chat_template to auto or on, or remove system_prompt",
            "system_prompt", "chat_template",
        )
        if self.generation_batch_size is not None:
            check_int_at_least(
                "generation_batch_size", self.generation_batch_size, 1,
                "rows per generate call; null for all in one",
            )


@dataclass
class Rollout:
    """A batch of sampled completions, prompt-major (the samples of prompt 0 come first)."""

    input_ids: Tensor  # [N, P + T] prompt (left-padded) + completion
    attention_mask: Tensor  # [N, P + T] 0 on prompt padding and after each completion's eos
    completion_mask: Tensor  # [N, T] 1 on completion tokens up to and including eos
    prompt_length: int
    texts: list[str]
    prompts: list[str]

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length :]


def uses_chat_template(tokenizer, cfg: SamplingConfig) -> bool:
    """Whether prompts go through ``tokenizer``'s chat template under ``cfg``.

    Raises :class:`ConfigError` for settings this tokenizer cannot honour (``on`` or a system
    prompt without a template): the module calls it as soon as the generator's tokenizer is
    loaded, so the mistake shows before any training.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template and cfg.chat_template == "on":
        raise ConfigError(
            "`chat_template: on` but the generator's tokenizer has no chat template; "
            "use auto or off, or a generator/tokenizer that has one (an Instruct model's)",
            "chat_template",
        )
    if not has_template and cfg.system_prompt is not None:
        raise ConfigError(
            "`system_prompt` is set but the generator's tokenizer has no chat template "
            "to put it in; remove system_prompt, or use a tokenizer with a chat template",
            "system_prompt",
        )
    return has_template and cfg.chat_template != "off"


def format_prompts(tokenizer, prompts: list[str], cfg: SamplingConfig) -> list[str]:
    """The text the generator is given for each prompt: raw, or in its chat template.

    In the chat template a prompt is one user message (after the optional system message),
    followed by the assistant header, so the completion is the assistant's answer. The
    rendered text carries the template's own special tokens (BOS included).
    """
    if not uses_chat_template(tokenizer, cfg):
        return list(prompts)
    system = [] if cfg.system_prompt is None else [
        {"role": "system", "content": cfg.system_prompt}
    ]
    return [
        tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def encode_prompts(tokenizer, prompts: list[str], cfg: SamplingConfig) -> dict[str, Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` of the formatted prompts.

    No special tokens are added: raw prompts never had any, and a chat template writes its own
    (a second BOS would be out of distribution for the Instruct model).
    """
    text = format_prompts(tokenizer, prompts, cfg)
    return tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def sample_rollout(
    generator: nn.Module, tokenizer, prompts: list[str], cfg: SamplingConfig
) -> Rollout:
    """Sample ``cfg.samples_per_prompt`` completions per prompt (only completions are examples).

    The rows (prompts x samples, prompt-major) are generated ``cfg.generation_batch_size`` at
    a time; every chunk shares the prompts' common left-padded width, and completions are
    right-padded to the longest chunk's, so the merged rollout looks like one call's.
    """
    device = next(generator.parameters()).device
    enc = encode_prompts(tokenizer, prompts, cfg)
    ids = enc["input_ids"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    step = cfg.generation_batch_size or len(ids)
    pieces = [
        _generate(generator, tokenizer, ids[i : i + step], mask[i : i + step], cfg)
        for i in range(0, len(ids), step)
    ]
    width = max(p.shape[1] for p in pieces)
    completion = torch.cat(
        [F.pad(p, (0, width - p.shape[1]), value=tokenizer.pad_token_id) for p in pieces]
    )
    is_eos = completion == tokenizer.eos_token_id
    # 1 up to and including the first eos; 0 afterwards (generate pads finished rows). A row
    # padded at merge time ended before its chunk did, so the padding lies after its eos.
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    texts = tokenizer.batch_decode(
        completion.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return Rollout(
        input_ids=torch.cat([ids, completion], 1),
        attention_mask=torch.cat([mask, completion_mask], 1),
        completion_mask=completion_mask,
        prompt_length=ids.shape[1],
        texts=texts,
        prompts=[p for p in prompts for _ in range(cfg.samples_per_prompt)],
    )


def _generate(
    generator: nn.Module, tokenizer, ids: Tensor, mask: Tensor, cfg: SamplingConfig
) -> Tensor:
    """One ``generate`` call; returns only the completion tokens (``[rows, <= max_new]``)."""
    out = generator.generate(
        input_ids=ids,
        attention_mask=mask,
        **_decoding(cfg),
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[:, ids.shape[1] :]


def completion_logprobs(
    model: nn.Module,
    rollout: Rollout,
    temperature: float = 1.0,
    rows: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """``log pi(token)`` of each completion token, ``[N, T]`` (mask with ``completion_mask``).

    ``rows`` selects a minibatch of the rollout. ``batch_size`` runs the model on at most that
    many rows at a time (a paper-scale rollout does not fit one forward pass) and concatenates
    the results, which stay differentiable when grad is on; ``None`` scores all rows at once.
    """
    ids, mask = rollout.input_ids, rollout.attention_mask
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    if batch_size is not None:
        check_int_at_least("batch_size", batch_size, 1)
    step = batch_size or len(ids)
    if step >= len(ids):
        return _logprobs(model, ids, mask, rollout.prompt_length, temperature)
    return torch.cat([
        _logprobs(model, ids[i : i + step], mask[i : i + step], rollout.prompt_length, temperature)
        for i in range(0, len(ids), step)
    ])


def _logprobs(model: nn.Module, ids: Tensor, mask: Tensor, prompt_length: int, temperature: float
              ) -> Tensor:
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logits = logits[:, prompt_length - 1 : -1].float() / temperature
    return token_logprobs(logits, ids[:, prompt_length:])


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-softmax of ``logits`` gathered at ``tokens`` (``[..., V]`` and ``[...]``)."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _decoding(cfg: SamplingConfig) -> dict:
    """``generate`` arguments: pure temperature / top-p sampling, or greedy at temperature 0
    (the paper validates its UUID task greedily)."""
    if cfg.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
