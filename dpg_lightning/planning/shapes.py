"""Model shapes for the planner, without building a model or touching the network.

:class:`ModelShape` is what the memory and FLOP model (:mod:`dpg_lightning.planning.cost`) needs
to know about a causal LM. :func:`resolve_shape` finds it for a ``ModelConfig``: given on the
command line, built from the config's own fields, read with ``transformers.AutoConfig`` from a
local directory or the local hub cache, or from :data:`KNOWN_SHAPES` (the models the paper's
configs name); ``plan`` must work on a laptop with no hub access.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.models.build import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """What the memory and FLOP model needs to know about one causal LM.

    ``arch`` picks the activation counts (``gpt2``, or ``llama`` for Llama-style blocks:
    RMSNorm, rotary positions, gated MLP); ``positions`` is the number of learned position
    embeddings (0 for rotary); ``bytes_per_param`` the weights' dtype size.
    """

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    positions: int
    tied: bool
    bytes_per_param: int = 4

    def block_params(self) -> int:
        """Weights of one block (biases included for GPT-2, none for Llama)."""
        h, f = self.hidden, self.intermediate
        if self.arch == "gpt2":
            return 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        kv = self.kv_heads * (h // self.heads)
        return 2 * h + 2 * h * h + 2 * h * kv + 3 * h * f

    @property
    def params(self) -> int:
        """All weights: embeddings (and an untied head), blocks, final norm."""
        final = 2 * self.hidden if self.arch == "gpt2" else self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return (self.vocab + self.positions) * self.hidden + self.layers * self.block_params() + (
            final + head
        )

    @property
    def matmul_params(self) -> int:
        """Weights each token multiplies (blocks + LM head; embedding look-ups are free):
        the ``P`` of the ``2P`` (forward) / ``6P`` (forward + backward) FLOPs per token."""
        return self.layers * self.block_params() + self.vocab * self.hidden


#: Shapes of the hub models the paper configs name, from their public ``config.json``
#: (huggingface.co/openai-community/gpt2: vocab_size 50257, n_embd 768, n_layer 12, n_head 12,
#: n_inner null = 4 x 768, n_positions 1024, tied; huggingface.co/meta-llama/
#: Llama-3.2-1B-Instruct: vocab_size 128256, hidden_size 2048, num_hidden_layers 16,
#: num_attention_heads 32, num_key_value_heads 8, intermediate_size 8192, rotary, tied).
KNOWN_SHAPES = {
    "openai-community/gpt2": ModelShape("gpt2", 50257, 768, 12, 12, 12, 3072, 1024, True),
    "meta-llama/Llama-3.2-1B-Instruct": ModelShape(
        "llama", 128256, 2048, 16, 32, 8, 8192, 0, True
    ),
}
KNOWN_SHAPES["gpt2"] = KNOWN_SHAPES["openai-community/gpt2"]
BYTE_VOCAB = 259  # models.byte_tokenizer(): 256 bytes + pad, eos, unk
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}
SHAPE_KEYS = "arch, vocab, hidden, layers, heads, kv_heads, intermediate, positions, tied"


def parse_shape(text: str, key: str, bytes_per_param: int) -> ModelShape:
    """``--target_shape arch=gpt2,vocab=50257,hidden=768,...`` as a :class:`ModelShape`."""
    values: dict[str, object] = {"bytes_per_param": bytes_per_param}
    try:
        for part in filter(None, text.split(",")):
            name, value = (s.strip() for s in part.split("="))
            values[name] = value if name == "arch" else (
                value.lower() in ("1", "true", "yes") if name == "tied" else int(value))
        values.setdefault("kv_heads", values.get("heads"))
        values.setdefault("positions", 0)
        shape = ModelShape(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"`{key} {text}` is not a shape ({err}); give every one of {SHAPE_KEYS} as "
            "key=value, e.g. arch=gpt2,vocab=50257,hidden=768,layers=12,heads=12,kv_heads=12,"
            "intermediate=3072,positions=1024,tied=true"
        ) from None
    if shape.arch not in ("gpt2", "llama"):
        raise ConfigError(f"`{key}`: arch is {shape.arch!r}; use gpt2 or llama (block type)")
    return shape


def _from_auto_config(name: str) -> ModelShape | None:
    """The shape from ``transformers.AutoConfig`` if ``name`` is a local directory or in the
    local hub cache (never the network); ``None`` otherwise."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    h, heads = c.hidden_size, c.num_attention_heads
    gpt2 = c.model_type == "gpt2"
    return ModelShape(
        "gpt2" if gpt2 else "llama", c.vocab_size, h, c.num_hidden_layers, heads,
        getattr(c, "num_key_value_heads", None) or heads,
        getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h,
        c.max_position_embeddings if gpt2 else 0, bool(getattr(c, "tie_word_embeddings", True)),
    )


def _local_tokenizer_size(name: str) -> int | None:
    """The size of a tokenizer saved in a local directory (``None`` if there is none)."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError):
        return None


def resolve_shape(mc: ModelConfig, key: str, given: str | None) -> tuple[ModelShape, str]:
    """``(shape, where it came from)`` of the model ``mc`` describes at ``key``: ``given``
    (``--generator_shape``/``--target_shape``), else built from ``mc``'s fields, else
    ``transformers.AutoConfig`` from a local directory or the local hub cache, else
    :data:`KNOWN_SHAPES`; ``untie_lm_head`` and ``dtype`` applied to every one."""
    option = f"--{key.split('.')[-1]}_shape"
    ask = f"give the shape: `{option} {SHAPE_KEYS.replace(', ', '=..,')}=..`"
    if given:
        shape, where = parse_shape(given, option, 4), f"given with {option}"
    elif mc.pretrained is None:
        vocab, where = BYTE_VOCAB, "built from config, byte tokenizer"
        if mc.tokenizer is not None:
            known = KNOWN_SHAPES.get(mc.tokenizer) or _from_auto_config(mc.tokenizer)
            size = known.vocab if known is not None else _local_tokenizer_size(mc.tokenizer)
            if size is None:
                raise ConfigError(f"`{key}.tokenizer: {mc.tokenizer}`: its vocabulary size is "
                                  f"not known here (not cached, not built in); {ask}")
            vocab, where = size, f"built from config, tokenizer {mc.tokenizer}"
        vocab = max(vocab, mc.vocab_size or 0)  # a built model's vocabulary may be larger
        shape = ModelShape(
            mc.arch, vocab, mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_heads,
            mc.intermediate_size, mc.max_position_embeddings if mc.arch == "gpt2" else 0,
            mc.arch == "gpt2" or mc.tie_word_embeddings,
        )
    else:
        shape, where = _from_auto_config(mc.pretrained), "transformers.AutoConfig, local"
        if shape is None and mc.pretrained in KNOWN_SHAPES:
            shape, where = KNOWN_SHAPES[mc.pretrained], "built-in, from its public config.json"
        if shape is None:
            raise ConfigError(
                f"`{key}.pretrained: {mc.pretrained}`: its shape is not in the local hub cache "
                f"and not built in, and plan uses no network; download it once (its "
                f"config.json is enough) or {ask}")
    tied = shape.tied and not getattr(mc, "untie_lm_head", False)
    return replace(shape, tied=tied, bytes_per_param=DTYPE_BYTES[mc.dtype]), where
