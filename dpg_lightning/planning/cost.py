"""The memory and FLOP model of one DPG step: plain functions of model shapes
(:mod:`dpg_lightning.planning.shapes`) and settings, without a model or the network.

:mod:`dpg_lightning.planning.estimate` assembles these terms into one step's plan, which
``python -m dpg_lightning plan`` prints; they live here, apart from it, so that each term can be
tested on its own and checked against measurements (``benchmarks/plan_check.py``, numbers in
``benchmarks/README.md``). Nothing here imports Lightning or builds a tensor.

**Where the activation counts come from.** Autograd keeps, per transformer block, the tensors
its backward formulas read. Counted per op of one block (fp32, per row and token; ``h``
hidden, ``f`` MLP width, ``a`` heads, ``s`` sequence):

* *first-order* (a forward whose gradient will be taken): GPT-2 keeps 8 hidden-sized tensors
  (both LayerNorms' input and output, the contiguous q, k, v the attention products read, the
  attention output the projection reads), 5 MLP-sized (the fc output, and the tanh-GELU's
  ``tanh(.)``, ``0.5 x``, ``1 + tanh(.)`` and output) and 1 score-sized (the softmax output);
  Llama keeps 10 / 4 / 1 (RMSNorm's input and normalised input twice, q, k, v after RoPE and
  ``repeat_kv``, the attention output; gate, up, SiLU(gate) and their product).
* *the Hessian-vector product's turn* (the double backward of one micro-batch, when it passes
  the loss head, where everything is alive at once): each block holds what its forward kept
  **plus, for each of those tensors, the HVP's pending gradient with respect to it** (waiting
  in autograd's input buffers for the backward to come back down): GPT-2 16 / 10 / 3 (two
  pending gradients reach the attention probabilities), Llama 23 / 8 / 3 (RMSNorm's double
  backward adds three). The unrolled SFT of ``higher``/``func`` keeps the same per step: the
  forward's tensors and the gradient graph's (which mirror them).

These integers were read off the op list and confirmed by tracing every allocation of a tiny
model (``benchmarks/plan_check.py --terms``); the assembled model is checked against measured
peaks at several shapes and settings (``benchmarks/README.md``, "Planner check").

**The loss head.** The loss runs in fp32 over ``rows x s x vocab`` logits; with GPT-2's 50257
tokens at 128 tokens per row these dominate. Logit-sized tensors alive at the peak: 4 in a
first-order backward (log-softmax output, the NLL gradient, the logits' gradient and its
zero-padded copy); 3 kept per step of the unrolled SFT (log-softmax output, NLL gradient,
padded gradient that the head's gradient products read, also alive when a replay step's HVP
reaches the bottom of the network); 7 at the HVP's turn (log-softmax output, NLL gradient, the
incoming adjoint of the logits' gradient, and the two outputs of the log-softmax double
backward with their temporaries: 4). Which moment of a replay step is the peak is
:func:`replay_moment`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpg_lightning.planning.shapes import ModelShape

GiB = 2**30


@dataclass(frozen=True)
class _Counts:
    hidden: int  # rows x s x h
    mlp: int  # rows x s x f
    scores: int  # rows x heads x s x s
    final: int  # hidden-sized, after the last block (final norm)


#: Per block, per row: tensors of each kind autograd holds (see the module docstring).
FIRST_ORDER = {"gpt2": _Counts(8, 5, 1, 2), "llama": _Counts(10, 4, 1, 3)}
HVP_TURN = {"gpt2": _Counts(16, 10, 3, 4), "llama": _Counts(23, 8, 3, 6)}
#: Logit-sized fp32 tensors (rows x s x vocab) alive at each kind of peak.
LOGITS_FIRST_ORDER, LOGITS_UNROLLED_STEP, LOGITS_HVP_TURN = 4, 3, 7


def block_activation_bytes(
    shape: ModelShape, rows: int, seq: int, counts: _Counts, elem: int
) -> int:
    """Bytes of the blocks' (and final norm's) saved tensors for ``rows`` rows of ``seq``."""
    per_block = (counts.hidden * shape.hidden + counts.mlp * shape.intermediate
                 + counts.scores * shape.heads * seq)
    return rows * seq * (shape.layers * per_block + counts.final * shape.hidden) * elem


def logits_bytes(shape: ModelShape, rows: int, seq: int, copies: int, elem: int = 4) -> int:
    """``copies`` logit-sized tensors (the loss upcasts to fp32: ``elem`` 4)."""
    return copies * rows * seq * shape.vocab * elem


def unrolled_graph_bytes(shape: ModelShape, rows: int, seq: int, elem: int | None = None) -> int:
    """What the unrolled SFT (``higher``/``func``) keeps for ``rows`` rows trained on: the
    forward's and the gradient graph's tensors, 3 logit-sized tensors per row."""
    elem = shape.bytes_per_param if elem is None else elem
    return block_activation_bytes(shape, rows, seq, HVP_TURN[shape.arch], elem) + logits_bytes(
        shape, rows, seq, LOGITS_UNROLLED_STEP
    )


def first_order_bytes(shape: ModelShape, rows: int, seq: int, elem: int | None = None) -> int:
    """A forward + backward without a graph of the gradient (a plain SFT step)."""
    elem = shape.bytes_per_param if elem is None else elem
    return block_activation_bytes(shape, rows, seq, FIRST_ORDER[shape.arch], elem) + logits_bytes(
        shape, rows, seq, LOGITS_FIRST_ORDER
    )


def slots(optim: str, momentum: float = 0.0) -> int:
    """Weight-sized optimizer moments the inner update reads (Adam: 2; SGD: its momentum)."""
    return 2 if optim in ("adam", "adamw") else int(bool(momentum))


def update_graph_copies(optim: str) -> int:
    """Weight-sized tensors the differentiable update of one step keeps for the backward.

    Adam/AdamW: ``(1 - b2) g`` and ``g`` (read by ``g * g``), the square root and the
    denominator, and the scaled first moment that the division reads: 5. SGD's update is
    linear in every input with constant factors: nothing.
    """
    return 5 if optim in ("adam", "adamw") else 0


@dataclass(frozen=True)
class Inner:
    """The inner SFT of one step as this rank sees it (see :func:`inner_terms`)."""

    backend: str  # higher | func | replay
    optim: str
    momentum: float
    trained_bytes: int  # the trained parameters' bytes (``inner.train_params``)
    steps: int  # T
    rows_per_step: int  # this rank's examples in one step
    rows_total: int  # this rank's examples over the SFT
    micro_rows: int  # rows of one micro-batch
    seq: int
    offload_adjoint: bool = False
    reward: str = "dpg"
    shared: bool = False  # one SFT over all ranks: gradients all-reduced
    sfts: int = 1  # SFTs per step, one after the other (sft_groups: inverse)

    @property
    def chunks(self) -> int:
        """Micro-batches per step on this rank."""
        return max(1, math.ceil(self.rows_per_step / self.micro_rows))


def replay_moment(shape: ModelShape, inner: Inner) -> tuple[str, int, int]:
    """The peak of one ``replay`` reverse step beyond the moments and the carried adjoint:
    ``(where, weight-sized buffers, graph)`` bytes, the largest of three moments.

    * *the HVP's turn at the loss head*: the whole micro-batch graph plus the HVP's pending
      gradients (:data:`HVP_TURN`) and 7 logit-sized tensors; weight-sized: the HVP pending
      for the weights, and the seeds ``dPhi/dg`` (kept for the later micro-batches) or, in
      the last micro-batch, the HVP summed over the earlier ones (2; 1 when the step is one
      micro-batch: its seeds are handed to the backward at its start).
    * *the bottom of the HVP's descent*: the same blocks, 3 logit-sized tensors; each weight
      now also has the forward graph's HVP part waiting to be summed with the gradient
      graph's (one more copy), and the token embedding (read twice, by the look-up and the
      tied head) its dense look-up scatter and the sum (2 embedding tables).
    * *the update's VJP* (:func:`~dpg_lightning.inner.optim.update_vjp`, one parameter at a
      time): the step's gradient turning into the seeds (1 copy) and about 5 temporaries the
      size of the parameter being differentiated (the largest: the embedding table); with a
      single micro-batch the step's graph is alive then (blocks as above, 3 logits).
    * with ``distributed: shared``, the gradient's all-reduce (see the comment below; the
      shared terms are derived from the code, not measured: no multi-rank measurement).

    With one inner step there is no carried adjoint and no weight HVP (see the code).

    Which one is largest depends on the shape: logits dominate the turn when
    ``rows x seq x vocab`` is large against the weights, the descent when it is small.
    """
    w, k = inner.trained_bytes, slots(inner.optim, inner.momentum)
    micro, seq = inner.micro_rows, inner.seq
    blocks = block_activation_bytes(shape, micro, seq, HVP_TURN[shape.arch], shape.bytes_per_param)
    table = shape.vocab * shape.hidden * shape.bytes_per_param
    largest = max(table, shape.hidden * shape.intermediate * shape.bytes_per_param)
    waiting = 2 if inner.chunks > 1 else 1
    unsplit = inner.chunks == 1
    # A shared SFT differentiates the update at the all-reduced gradient, held beside this
    # rank's part (1 copy more at the VJP), and the all-reduce itself flattens the gradients
    # into one buffer and sums a copy of it (3 copies, no graph).
    vjp = (1 + int(inner.shared)) * w + 5 * largest + (1 + k) * largest * inner.offload_adjoint
    incoming = 0  # what the carried adjoint term does not cover
    if inner.steps == 1:
        # The only reverse step is the first: dPhi/dparams comes in and is used up by the
        # VJP, no adjoint goes out, and the HVP differentiates eps alone (no weight parts).
        waiting, table, incoming = waiting - 1, 0, w
    moments = [
        ("the gradient's all-reduce", (3 * w + incoming) * inner.shared, 0),
        ("the HVP's turn", waiting * w, blocks + logits_bytes(shape, micro, seq, LOGITS_HVP_TURN)),
        ("the HVP's descent", (waiting + int(inner.steps > 1)) * w + 2 * table,
         blocks + logits_bytes(shape, micro, seq, LOGITS_UNROLLED_STEP)),
        ("the update's VJP", vjp + incoming, unsplit * (
            blocks + logits_bytes(shape, micro, seq, LOGITS_UNROLLED_STEP))),
    ]
    return max(moments, key=lambda m: m[1] + m[2])


def inner_terms(shape: ModelShape, inner: Inner) -> list[tuple[str, int]]:
    """Device bytes the inner SFT adds on top of the target's weights, itemised.

    * ``replay`` (one reverse step is the peak; nothing depends on T): the optimizer moments;
      the adjoint carried from step to step (parameters + moments, ``1 + slots`` weight
      copies; none in device memory with ``offload_adjoint``); the HVP's weight-sized buffers
      and one micro-batch's double-backward graph at the worst moment of the step
      (:func:`replay_moment`).
    * ``higher``/``func`` (the whole SFT on the tape): every step's parameters (``higher``
      also copies the initial ones) and differentiable update (:func:`update_graph_copies`),
      the last moments, the graph of every example trained on (:func:`unrolled_graph_bytes`:
      micro-batching does not shrink it, each micro-batch's graph is kept for the step), and
      the larger of the last update's temporaries and what the backward adds when it starts.
      ``Phi``'s own forward on the trained target comes on top and is not modelled (it
      depends on the metric).
    * ``reward: dataset``: a plain SFT: moments, the gradient and its running sum, one
      micro-batch's first-order graph.
    """
    w = inner.trained_bytes
    k = slots(inner.optim, inner.momentum)
    micro = inner.micro_rows
    if inner.reward == "dataset":
        return [
            ("inner optimizer state", k * w),
            ("gradient + micro-batch sum", 2 * w),
            (f"first-order graph, {micro} rows", first_order_bytes(shape, micro, inner.seq)),
        ]
    if inner.backend == "replay":
        adjoint = 0 if inner.offload_adjoint or inner.steps == 1 else (1 + k) * w
        moment, hvp, graph = replay_moment(shape, inner)
        return [
            ("inner optimizer state", k * w),
            ("carried adjoint" + (" (offloaded)" if inner.offload_adjoint else ""), adjoint),
            (f"HVP buffers, at {moment}", hvp),
            (f"double-backward graph, {micro} rows", graph),
        ]
    versions = inner.steps + (1 if inner.backend == "higher" else 0)
    copies = update_graph_copies(inner.optim)
    # The last moment on top of the kept graph: the last update's temporaries (the decayed
    # weights and the step being subtracted; SGD: the step), or the backward's start, which
    # has freed the last update's graph and holds the adjoint, the seeds dPhi/dg and the
    # HVP's turn of one micro-batch (4 logit-sized tensors more than the kept 3).
    temporaries = (2 if copies else 1) * w
    backward = (2 + k - copies) * w + logits_bytes(
        shape, micro, inner.seq, LOGITS_HVP_TURN - LOGITS_UNROLLED_STEP)
    last = (("last update's temporaries", temporaries) if temporaries >= backward
            else ("backward: adjoint, seeds, HVP turn", backward))
    return [
        (f"parameters of {versions} steps", versions * w),
        (f"update graphs of {inner.steps} steps + moments", (inner.steps * copies + k) * w),
        (f"unrolled graph, {inner.rows_total} rows",
         unrolled_graph_bytes(shape, inner.rows_total, inner.seq)),
        last,
    ]


def checkpoint_bytes(trained_bytes: int, k: int, saved: int, segment: int, offload: bool
                     ) -> tuple[int, int]:
    """``replay``'s storage: ``(stored, host_buffer)`` bytes, as
    :func:`~dpg_lightning.inner.replay_storage.check_replay_storage` counts them.

    ``stored``: ``saved`` states of (trained parameters + ``k`` moments), plus two for an
    offloaded adjoint (one read while the next is written); ``host_buffer``: the host copies
    of one recomputed segment (``every_k``/``sqrt``), always in host memory.
    """
    per_state = trained_bytes * (1 + k)
    return per_state * (saved + 2 * int(offload)), per_state * (segment - 1)


@dataclass(frozen=True)
class RolloutShape:
    """The sizes of this rank's sampling and policy update that memory and FLOPs depend on
    (not :class:`dpg_lightning.dpg.rollout.Rollout`, the sampled batch itself; see
    :func:`rollout_bytes` and :func:`policy_update_bytes`)."""

    rows: int  # prompts x samples on this rank
    prompt: int  # prompt tokens (assumed)
    new: int  # max_new_tokens
    chunk: int  # rows per generate / no-grad scoring call
    minibatch: int  # rows per policy-update minibatch
    updates: int  # minibatches (optimizer steps) per pass
    compute_bytes: int  # activation dtype (2 under bf16 precision)
    reference: bool  # policy.beta > 0
    micro: int | None = None  # policy.micro_batch_size

    @property
    def policy_rows(self) -> int:
        """Rows per policy-update forward/backward: a micro-batch, or the whole minibatch."""
        return min(self.minibatch, self.micro or self.minibatch)


def generator_persistent(shape: ModelShape, reference: bool) -> list[tuple[str, int]]:
    """The generator's bytes held through the whole step: weights, their gradients (kept from
    the last update until the next ``zero_grad``), AdamW's two moments (in the parameters'
    dtype, as ``torch.optim.AdamW`` keeps them) and the frozen reference copy."""
    w = shape.params * shape.bytes_per_param
    items = [("generator weights", w), ("generator gradients", w),
             ("AdamW state (2 moments)", 2 * w)]
    if reference:
        items.append(("reference copy (policy.beta > 0)", w))
    return items


def rollout_bytes(shape: ModelShape, r: RolloutShape) -> list[tuple[str, int]]:
    """Generation for one chunk: the KV cache over prompt + completion, and the last position's
    logits with the sampler's fp32 copies (about 4); or, if larger, one chunk's no-grad scoring
    (model logits over prompt + completion, plus the fp32 copy and log-softmax of the
    completion's)."""
    e, ctx = r.compute_bytes, r.prompt + r.new
    head_dim = shape.hidden // shape.heads
    kv = 2 * shape.layers * shape.kv_heads * head_dim * ctx * r.chunk * e
    sample = r.chunk * shape.vocab * (e + 4 * 4)
    score = r.chunk * shape.vocab * (ctx * e + 2 * r.new * 4)
    if kv + sample >= score:
        return [(f"KV cache, {r.chunk} rows x {ctx} tokens", kv), ("sampling logits", sample)]
    return [(f"scoring logits, {r.chunk} rows x {ctx} tokens", score)]


def policy_update_bytes(shape: ModelShape, r: RolloutShape) -> list[tuple[str, int]]:
    """One micro-batch's forward + backward through the generator (the whole minibatch
    without ``policy.micro_batch_size``): the blocks' first-order activations, the model's
    logits over prompt + completion, and 4 fp32 completion-logit copies (upcast, temperature,
    log-softmax, its gradient)."""
    ctx, rows = r.prompt + r.new, r.policy_rows
    acts = block_activation_bytes(shape, rows, ctx, FIRST_ORDER[shape.arch], r.compute_bytes)
    logits = rows * shape.vocab * (ctx * r.compute_bytes + 4 * r.new * 4)
    return [(f"activations, {rows} rows x {ctx} tokens", acts), ("policy logits", logits)]


@dataclass(frozen=True)
class Flops:
    """FLOPs of one DPG step on one rank, by phase."""

    rollout: float
    scoring: float
    policy: float
    inner_sft: float
    attribution: float


def step_flops(gen: ModelShape, target: ModelShape, r: RolloutShape, inner: Inner,
               iterations: int, recompute_steps: int) -> Flops:
    """FLOPs of one step on one rank (``2P`` per token forward, ``6P`` forward + backward,
    attention's own FLOPs left out).

    Rollout ``2P`` per prompt and generated token; scoring the old (and the reference)
    log-probabilities ``2P`` per token; the policy update ``6P`` per token per iteration.
    Inner SFT ``6P`` per target token over the SFT (one epoch). Attribution: ``replay``'s
    reverse step recomputes the step's gradient with its graph and runs the HVP through it,
    taken as ``3x`` the SFT step (``benchmarks/README.md`` has the measured ratios), plus a
    graph-free gradient pass when the step has several micro-batches (the seeds are needed
    before any micro-batch's HVP), plus one graph-free step per step that ``every_k``/``sqrt``
    recomputes;
    ``higher``/``func`` only run the backward through the tape, about ``2x`` the SFT.
    """
    tokens = r.rows * (r.prompt + r.new)
    p_gen, p_t = gen.matmul_params, target.matmul_params
    sft_step = 6 * p_t * inner.rows_per_step * inner.seq * inner.sfts
    sft = 6 * p_t * inner.rows_total * inner.seq * inner.sfts
    if inner.reward == "dataset":
        attribution = 0.0
    elif inner.backend == "replay":
        extra = inner.steps if inner.chunks > 1 else 0
        attribution = 3 * sft + (extra + recompute_steps) * sft_step
    else:
        attribution = 2 * sft
    return Flops(
        rollout=2 * p_gen * tokens,
        scoring=2 * p_gen * tokens * (2 if r.reference else 1),
        policy=6 * p_gen * tokens * iterations,
        inner_sft=sft,
        attribution=attribution,
    )
