"""Sampling completions from the generator and scoring their log-probabilities.

Prompts are left-padded so every completion starts at the same column; log-probabilities use
position ids derived from the attention mask (as ``generate`` does), at the sampling
temperature, so the policy being scored is the policy that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpg_lightning.errors import check_int_at_least, check_positive, require


@dataclass
class SamplingConfig:
    """Generation settings (``samples_per_prompt`` is TRL's ``num_generations``)."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        key = "model.sampling"
        check_int_at_least(f"{key}.samples_per_prompt", self.samples_per_prompt, 1)
        check_positive(f"{key}.temperature", self.temperature)
        require(
            0 < self.top_p <= 1, f"`{key}.top_p` is {self.top_p}; it must be in (0, 1]"
        )
        check_int_at_least(f"{key}.max_new_tokens", self.max_new_tokens, 1)


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


@torch.no_grad()
def sample_rollout(
    generator: nn.Module, tokenizer, prompts: list[str], cfg: SamplingConfig
) -> Rollout:
    """Sample ``cfg.samples_per_prompt`` completions per prompt (only completions are examples)."""
    device = next(generator.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    out = generator.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completion = out[:, ids.shape[1] :]
    is_eos = completion == tokenizer.eos_token_id
    # 1 up to and including the first eos; 0 afterwards (generate pads finished rows).
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    texts = tokenizer.batch_decode(
        completion.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([mask, completion_mask], 1),
        completion_mask=completion_mask,
        prompt_length=ids.shape[1],
        texts=texts,
        prompts=[p for p in prompts for _ in range(cfg.samples_per_prompt)],
    )


def completion_logprobs(
    model: nn.Module, rollout: Rollout, temperature: float = 1.0, rows: Tensor | None = None
) -> Tensor:
    """``log pi(token)`` of each completion token, ``[N, T]`` (mask with ``completion_mask``).

    ``rows`` selects a minibatch of the rollout.
    """
    ids, mask = rollout.input_ids, rollout.attention_mask
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logits = logits[:, rollout.prompt_length - 1 : -1].float() / temperature
    return token_logprobs(logits, ids[:, rollout.prompt_length :])


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-softmax of ``logits`` gathered at ``tokens`` (``[..., V]`` and ``[...]``)."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
