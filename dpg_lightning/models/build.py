"""Build or load the generator and target causal LMs and their tokenizers.

The embedded default needs no download: tiny GPT-2 / Llama models are built from a config and
paired with transformers' byte-level ``ByT5Tokenizer`` (256 bytes + pad/eos/unk, no vocab file).
Real checkpoints (hub names or local paths) load through the same ``ModelConfig``.

Every model is built with eager attention and zero dropout, because the inner SFT is
differentiated twice: SDPA/flash kernels have no double backward, and dropout would make a
metagradient depend on RNG state that finite differences cannot replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpg_lightning.common.errors import check_int_at_least, check_positive, require
from dpg_lightning.common.settings import Settings

_DROPOUT_KEYS = (
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_first_dropout",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
)


@dataclass
class ModelConfig(Settings):
    """How to obtain one causal LM.

    Attributes:
        pretrained: hub name or local directory for a real checkpoint; ``None`` builds a tiny
            model from the fields below (random init, seeded).
        arch: ``gpt2`` (tied LM head) or ``llama`` (untied head by default) for built models.
        hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings: shape of
            a built model.
        tie_word_embeddings: for ``llama`` only (GPT-2 is tied).
        untie_lm_head: give a tied head (GPT-2's) its own matrix, initialised from the
            embeddings (the paper's GPT-2 target; see :func:`untie_lm_head`).
        vocab_size: a built model's vocabulary (default: its tokenizer's size). Larger than
            the tokenizer for rehearsals at a real model's shape (GPT-2's 50257 logits) with
            the download-free byte tokenizer.
        init_std: std of a built model's random weights (``initializer_range``).
        seed: RNG seed of a built model's initialisation, so every process builds the same one.
        dtype: ``float32`` (default), ``float64`` (tests) or ``bfloat16``.
        tokenizer: hub name or directory of a tokenizer; ``None`` uses ``pretrained`` when set,
            else the byte-level tokenizer.
        pretrain_files, pretrain_steps, pretrain_lr: optional in-process next-token pretraining
            (``dpg_lightning.models.pretrain``) on local text files, one example per line, so tiny
            proxies start from a model that knows a language; nothing is downloaded.
    """

    pretrained: str | None = None
    arch: Literal["gpt2", "llama"] = "gpt2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    untie_lm_head: bool = False
    vocab_size: int | None = None
    init_std: float = 0.02
    seed: int = 0
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    tokenizer: str | None = None
    pretrain_files: list[str] | None = None
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3

    def check(self) -> None:
        """A built model's shape and init (``arch`` and ``dtype`` are checked from their
        annotations); one ``pretrain_files`` string becomes a list. Keys are relative: the
        same dataclass serves ``model.generator`` and ``model.target``."""
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            check_int_at_least(name, getattr(self, name), 1)
        require(
            self.hidden_size % self.num_heads == 0,
            f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_heads` "
            f"({self.num_heads})",
            "hidden_size", "num_heads",
        )
        check_positive("init_std", self.init_std)
        check_int_at_least("pretrain_steps", self.pretrain_steps, 0)
        if self.vocab_size is not None:
            check_int_at_least("vocab_size", self.vocab_size, 1)
        check_positive("pretrain_lr", self.pretrain_lr)
        if self.pretrain_files is not None and isinstance(self.pretrain_files, str):
            self.pretrain_files = [self.pretrain_files]


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A download-free byte-level tokenizer (vocab 259: pad=0, eos=1, unk=2, bytes from 3)."""
    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer for ``cfg``; pads on the left so batched generation continues each prompt."""
    source = cfg.tokenizer or cfg.pretrained
    tok = byte_tokenizer() if source is None else AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {source!r} has neither a pad nor an eos token; set one")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} has no eos token; examples need one to end")
    tok.padding_side = "left"
    return tok


def _no_dropout(config) -> None:
    for key in _DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def build_model(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """Build or load the causal LM ``cfg`` describes: eval mode, eager attention, no dropout."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, dtype=dtype, attn_implementation="eager"
        )
        _no_dropout(model.config)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    else:
        vocab_size = max(vocab_size, cfg.vocab_size or 0)
        common = dict(
            vocab_size=vocab_size,
            attn_implementation="eager",
            initializer_range=cfg.init_std,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        if cfg.arch == "gpt2":
            config = GPT2Config(
                n_embd=cfg.hidden_size,
                n_layer=cfg.num_layers,
                n_head=cfg.num_heads,
                n_inner=cfg.intermediate_size,
                n_positions=cfg.max_position_embeddings,
                **common,
            )
            cls = GPT2LMHeadModel
        else:
            config = LlamaConfig(
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
                tie_word_embeddings=cfg.tie_word_embeddings,
                **common,
            )
            cls = LlamaForCausalLM
        _no_dropout(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = cls(config)
        model = model.to(dtype)
    if cfg.untie_lm_head:
        untie_lm_head(model)
    _check_vocab(model, cfg, vocab_size)
    return model.eval()


def untie_lm_head(model: PreTrainedModel) -> None:
    """Give a tied LM head its own matrix, initialised from the token embeddings.

    The paper's GPT-2 target (as far as its loader shows) has a separate head initialised from
    the embeddings: a pattern drawn into the head, or its norm, then sees only the gradients of
    the output softmax, not those of the input embedding the tied matrix also is. Untying in
    place keeps every weight's value; the config records it, so a saved model stays untied.
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def _check_vocab(model: PreTrainedModel, cfg: ModelConfig, vocab_size: int) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-run."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(
            f"model {cfg.pretrained or cfg.arch!r} has {rows} token embeddings but its tokenizer "
            f"has {vocab_size} tokens: set `tokenizer` to the one the model was trained with"
        )
