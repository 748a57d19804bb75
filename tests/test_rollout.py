"""Rollouts: the chat template, chunked generation and chunked scoring.

The generator is a tiny float64 GPT-2 whose LM head favours eos, so completions end at
different lengths and the eos/padding bookkeeping is exercised (GPT-2: transformers' eager
Llama attention yields NaN at left-padding positions in float64, which float64 gradients
would carry); the chat tokenizer is the
byte-level one with Llama-3 special tokens and a Llama-3-style template (nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.dpg.rollout import (
    Rollout,
    SamplingConfig,
    completion_logprobs,
    encode_prompts,
    format_prompts,
    sample_rollout,
    uses_chat_template,
)
from dpg_lightning.models.build import ModelConfig, build_model, byte_tokenizer, load_tokenizer

PROMPTS = ["hello", "a much longer prompt here", "mid size", "z"]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def _generator(vocab_size: int, eos_id: int, eos_bias: float = 3.0) -> nn.Module:
    """A tiny float64 GPT-2 whose head adds ``eos_bias`` to the eos logit (eos ~ 1 in 10)."""
    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                      dtype="float64")
    model = build_model(cfg, vocab_size)
    head = nn.Linear(16, vocab_size, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos_id] = eos_bias
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def gen(tok):
    return _generator(len(tok), tok.eos_token_id)


def _sample(gen, tok, cfg: SamplingConfig, seed: int = 0, prompts=PROMPTS) -> Rollout:
    torch.manual_seed(seed)
    return sample_rollout(gen, tok, prompts, cfg)


def _reference_rollout(generator, tokenizer, prompts, cfg) -> Rollout:
    """``sample_rollout`` as it was before chunks and chat templates (one generate call)."""
    device = next(generator.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(cfg.samples_per_prompt, 0).to(device)
    out = generator.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    completion = out[:, ids.shape[1]:]
    is_eos = completion == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    texts = tokenizer.batch_decode(
        completion.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return Rollout(out, torch.cat([mask, completion_mask], 1), completion_mask, ids.shape[1],
                   texts, [p for p in prompts for _ in range(cfg.samples_per_prompt)])


def _check_invariants(r: Rollout, tok, cfg: SamplingConfig, prompts=PROMPTS) -> None:
    n = len(prompts) * cfg.samples_per_prompt
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    width = enc["input_ids"].shape[1]
    t = r.input_ids.shape[1] - r.prompt_length
    assert r.prompt_length == width and 1 <= t <= cfg.max_new_tokens
    assert r.input_ids.shape == r.attention_mask.shape == (n, width + t)
    assert r.completion_mask.shape == (n, t)
    k = cfg.samples_per_prompt
    assert torch.equal(r.input_ids[:, :width], enc["input_ids"].repeat_interleave(k, 0))
    assert torch.equal(r.attention_mask[:, :width], enc["attention_mask"].repeat_interleave(k, 0))
    assert torch.equal(r.attention_mask[:, width:], r.completion_mask)
    assert r.prompts == [p for p in prompts for _ in range(k)]
    eos = r.completion_ids == tok.eos_token_id
    for i in range(n):
        row_eos = eos[i].nonzero()
        end = int(row_eos[0]) + 1 if len(row_eos) else t  # up to and including the first eos
        assert r.completion_mask[i, :end].all() and not r.completion_mask[i, end:].any()
        assert (r.completion_ids[i, end:] == tok.pad_token_id).all()
        assert r.texts[i] == tok.decode(r.completion_ids[i, : end - (1 if len(row_eos) else 0)],
                                        skip_special_tokens=True)


# ------------------------------------------------------------------ chunked generation


def test_one_call_is_bit_identical_to_the_previous_code(gen, tok):
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=12)
    got = _sample(gen, tok, cfg, seed=5)
    torch.manual_seed(5)
    want = _reference_rollout(gen, tok, PROMPTS, cfg)
    for field in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert (got.prompt_length, got.texts, got.prompts) == (
        want.prompt_length, want.texts, want.prompts)


@pytest.mark.parametrize("chunk", [1, 5, 12, 100])
def test_chunked_rollout_keeps_the_invariants(gen, tok, chunk):
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=12, generation_batch_size=chunk)
    r = _sample(gen, tok, cfg, seed=1)
    _check_invariants(r, tok, cfg)
    ends = r.completion_mask.sum(1)
    assert (ends < r.completion_mask.shape[1]).any(), "some rows should end early (eos)"


def test_a_chunk_is_the_rollout_its_rows_would_have_had_alone(gen, tok):
    """The first chunk holds the longest prompt (so its padding equals the merged one) and
    uses the RNG first: it must equal a standalone rollout of that prompt, and the merge may
    only have right-padded its completions (seen on a seed where that chunk ended first)."""
    prompts = ["a much longer prompt here", "hello", "z", "mid"]
    chunked = SamplingConfig(samples_per_prompt=2, max_new_tokens=10, generation_batch_size=2)
    one_call = SamplingConfig(samples_per_prompt=2, max_new_tokens=10)
    padded = 0
    for seed in range(6):
        merged = _sample(gen, tok, chunked, seed=seed, prompts=prompts)
        alone = _sample(gen, tok, one_call, seed=seed, prompts=prompts[:1])
        t = alone.input_ids.shape[1]
        assert torch.equal(merged.input_ids[:2, :t], alone.input_ids)
        assert torch.equal(merged.attention_mask[:2, :t], alone.attention_mask)
        assert not merged.attention_mask[:2, t:].any()
        assert (merged.input_ids[:2, t:] == tok.pad_token_id).all()
        assert merged.texts[:2] == alone.texts
        padded += t < merged.input_ids.shape[1]
    assert padded, "no seed had a chunk that ended before the others"


def test_chunked_scoring_equals_one_pass(gen, tok):
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=12, generation_batch_size=5)
    r = _sample(gen, tok, cfg, seed=2)
    whole = completion_logprobs(gen, r, 0.7)
    for batch_size in (1, 4, 12, 50):
        chunked = completion_logprobs(gen, r, 0.7, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    rows = torch.tensor([7, 0, 3, 11, 5])
    torch.testing.assert_close(completion_logprobs(gen, r, 0.7, rows=rows, batch_size=2),
                               whole[rows], rtol=1e-12, atol=1e-12)


def test_chunked_scoring_stays_differentiable(gen, tok):
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=8, generation_batch_size=3)
    r = _sample(gen, tok, cfg, seed=4)
    grads = []
    for batch_size in (None, 3):
        gen.zero_grad()
        logp = completion_logprobs(gen, r, 1.0, batch_size=batch_size)
        (logp * r.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    gen.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, key", [
    ({"generation_batch_size": 0}, "generation_batch_size"),
    ({"chat_template": "yes"}, "chat_template"),
    ({"chat_template": "off", "system_prompt": "Be brief."}, "system_prompt"),
])
def test_bad_sampling_settings(kwargs, key):
    """Keys relative to the dataclass (the CLI prefixes ``model.sampling``)."""
    with pytest.raises(ConfigError, match=f"^`{key}`"):
        SamplingConfig(**kwargs)


# ------------------------------------------------------------------ chat template


@pytest.fixture(scope="module")
def chat_tok():
    tok = byte_tokenizer()
    tok.add_special_tokens({
        "bos_token": "<|begin_of_text|>",
        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    })
    tok.chat_template = LLAMA3_TEMPLATE
    tok.padding_side = "left"  # as load_tokenizer sets it
    return tok


def test_chat_template_renders_system_user_and_assistant_header(chat_tok):
    cfg = SamplingConfig(system_prompt="Be brief.")
    [text] = format_prompts(chat_tok, ["Rephrase this article: Cats purr."], cfg)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nRephrase this article: Cats purr.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    [plain] = format_prompts(chat_tok, ["hi"], SamplingConfig())
    assert plain == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert format_prompts(chat_tok, ["hi"], SamplingConfig(chat_template="off")) == ["hi"]


def test_chat_prompts_start_with_one_bos_token(chat_tok):
    enc = encode_prompts(chat_tok, ["hi", "a longer prompt"], SamplingConfig())
    bos, header = chat_tok.bos_token_id, chat_tok.convert_tokens_to_ids("<|start_header_id|>")
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        real = ids[mask.bool()].tolist()
        assert real[0] == bos and real[1] == header and real.count(bos) == 1
        assert real[-2:] == chat_tok("\n\n", add_special_tokens=False)["input_ids"]


def test_sampling_with_the_chat_template(chat_tok):
    gen = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                  intermediate_size=32), len(chat_tok))
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=6, system_prompt="Be brief.",
                         generation_batch_size=3)
    prompts = ["Rephrase: cats.", "Rephrase: a longer article about dogs."]
    r = _sample(gen, chat_tok, cfg, prompts=prompts)
    enc = encode_prompts(chat_tok, prompts, cfg)
    assert r.prompt_length == enc["input_ids"].shape[1]
    assert torch.equal(r.input_ids[:, : r.prompt_length], enc["input_ids"].repeat_interleave(2, 0))
    assert r.prompts == [p for p in prompts for _ in range(2)] and len(r.texts) == 4
    assert completion_logprobs(gen, r).shape == r.completion_mask.shape


def test_chat_settings_the_tokenizer_cannot_honour(tok, chat_tok):
    with pytest.raises(ConfigError, match=r"`chat_template: on`"):
        uses_chat_template(tok, SamplingConfig(chat_template="on"))
    with pytest.raises(ConfigError, match=r"`system_prompt`"):
        uses_chat_template(tok, SamplingConfig(system_prompt="Be brief."))
    assert not uses_chat_template(tok, SamplingConfig())  # auto, no template: raw prompts
    assert uses_chat_template(chat_tok, SamplingConfig(chat_template="on"))
    assert not uses_chat_template(chat_tok, SamplingConfig(chat_template="off"))
