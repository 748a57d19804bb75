"""What would it take to draw a QR code that scans? An oracle for the tiny QR task (issue 16).

DPG trains a generator whose samples are SFT data. This study removes the generator: it
searches for the best *distribution* over candidate examples directly, then draws SFT batches
from it and scores them with the real inner SFT and the real QR reader. No generator can beat
that search on the same candidates and batch size, so the numbers bound what any generator
could reach with these settings.

Why it can be exact: with ``inner.train_params: lm_head`` (untied), SGD and one inner step (the
oracle sets ``inner.batch_size`` to the batch), the patch's change is linear in the batch's
example counts ``c``:

    D = lr * sum_e c_e g_e / sum_e c_e T_e,     g_e = sum_t (onehot(y_t) - p_t) h_t  (patch part)

with ``h_t`` the target's final hidden state, ``p_t`` its next-token distribution and ``T_e`` the
scored tokens of example e. The script checks this model against the real SFT on a random batch
and stops if they disagree. All candidates have the same length, so for a distribution ``pi``
the expected change is ``lr * pi @ g / T``, and ``Phi`` (concave in D) is maximized over the
simplex by Adam on softmax logits. A sampled batch of n examples then carries multinomial noise
of order ``1/sqrt(n)``; the script measures what that noise costs by sampling batches and
running the real SFT on them.

``--flips`` measures the other side of the bar: how often the reader decodes the exact code
after k random pixels are flipped.

    python -m studies.qr_oracle                                  # 2-character examples
    python -m studies.qr_oracle --length 8 --batches 256,1024    # 9025 random 8-char strings
    python -m studies.qr_oracle --noisy-batch 256 --batches 256   # tuned for sampled batches
    python -m studies.qr_oracle --flips
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import string
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.dpg_step import build
from dpg_lightning.inner import InnerConfig
from dpg_lightning.inner.sft import sft_on_texts
from dpg_lightning.metrics.patterns import (
    OFFICIAL_QR_TEXT,
    LMHeadPattern,
    decode_qr,
    lm_head_patch,
    load_bitmap,
    qr_bitmap,
)

PRINTABLE = string.printable[:95]  # the 95 printable ASCII characters, space included


def candidates(length: int, count: int, seed: int) -> list[str]:
    """Every string of ``length`` printable characters when that is at most ``count`` of them
    (length 1 or 2), else ``count`` random ones (a subset: the bound then is a lower bound)."""
    if len(PRINTABLE) ** length <= count:
        return ["".join(p) for p in itertools.product(PRINTABLE, repeat=length)]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(PRINTABLE), (count, length), generator=gen).tolist()
    return ["".join(PRINTABLE[i] for i in row) for row in picks]


@torch.no_grad()
def patch_gradients(target, metric: LMHeadPattern, rows) -> torch.Tensor:
    """``g_e`` for every example row: minus the patch's gradient of its summed token loss.

    The whole head's gradient is formed per chunk and cut by :func:`lm_head_patch`, so the
    patch is the metric's in either orientation; chunks keep that gradient under 2**26 entries.
    """
    vocab, hidden_size = target.get_output_embeddings().weight.shape
    h, w = metric.shape
    out = []
    for idx in torch.arange(len(rows)).split(max(1, 2**26 // (vocab * hidden_size))):
        ids, mask, labels = rows.input_ids[idx], rows.attention_mask[idx], rows.labels[idx]
        result = target(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = result.hidden_states[-1][:, :-1].float()  # after the final norm: the head's input
        probs = result.logits[:, :-1].float().softmax(-1)
        nxt = labels[:, 1:]
        scored = (nxt != -100).to(probs.dtype)[..., None]
        resid = (F.one_hot(nxt.clamp(min=0), vocab).to(probs.dtype) - probs) * scored
        head = torch.einsum("btv,bth->vhb", resid, hidden)  # [vocab, hidden, examples]
        patch = lm_head_patch(head, metric.r0, metric.c0, h, w, metric.orientation)
        out.append(patch.permute(2, 0, 1))
    return torch.cat(out)


def check_preconditions(model, inner: InnerConfig) -> None:
    """The linear model holds only for an untied head trained alone by SGD in one step."""
    target = model.target
    tied = target.get_output_embeddings().weight is target.get_input_embeddings().weight
    problems = [
        f"inner.train_params is {inner.train_params!r}, needs 'lm_head'"
        if inner.train_params != "lm_head" else "",
        f"inner.optim.name is {inner.optim.name!r}, needs 'sgd'" if inner.optim.name != "sgd"
        else "",
        "the target's head is tied to its input embedding; needs tie_word_embeddings: false"
        if tied else "",
        "metric is not an LMHeadPattern" if not isinstance(model.metric, LMHeadPattern) else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise SystemExit("error: the oracle's linear model does not hold: " + "; ".join(problems))


def linear_and_real_phi(model, inner: InnerConfig, texts: list[str], g: torch.Tensor,
                        tokens: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """``Phi`` of one random batch of ``n`` candidates by the linear model and by the real SFT."""
    idx = torch.randint(len(texts), (n,), generator=torch.Generator().manual_seed(seed))
    real = sft_on_texts(model.target, model.target_tokenizer, [texts[i] for i in idx],
                        model.metric, dataclasses.replace(inner, batch_size=n), seed)
    lr = inner.optim.lr
    linear = model.metric.of_delta(lr * g[idx].sum(0) / tokens[idx].sum())
    return float(linear), float(real)


def optimize(g: torch.Tensor, tokens: float, lr: float, metric: LMHeadPattern,
             steps: int, noisy_batch: int = 0) -> torch.Tensor:
    """``pi`` maximizing ``Phi(lr * pi @ g / T)`` over the simplex (concave: Adam finds it).

    ``noisy_batch = n > 0`` maximizes ``E[MetricFn]`` of a sampled batch of n examples instead: the
    counts' multinomial noise in its Gaussian approximation, 8 reparameterized draws per step.
    """
    logits = torch.zeros(len(g), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    flat = g.reshape(len(g), -1)
    for _ in range(steps):
        pi = logits.softmax(0)
        mean = pi @ flat
        if noisy_batch:
            z = torch.randn(8, len(g)) * pi.sqrt()  # count noise / n, in the basis of examples
            mean = mean + (z @ flat - z.sum(1, keepdim=True) * mean) / noisy_batch ** 0.5
        delta = (lr * mean / tokens).reshape(-1, *metric.shape)
        loss = -metric.of_delta(delta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach().softmax(0)


def sampled_readouts(model, inner: InnerConfig, texts: list[str], pi: torch.Tensor, n: int,
                     repeats: int, seed: int) -> tuple[list[float], int]:
    """Pixel accuracies and decode count of ``repeats`` batches of ``n`` examples drawn from
    ``pi``, each trained on by the real inner SFT (one step over the batch)."""
    gen = torch.Generator().manual_seed(seed)
    accs, decodes = [], 0
    for r in range(repeats):
        idx = torch.multinomial(pi, n, replacement=True, generator=gen).tolist()
        read: dict[str, float] = {}

        def phi(target, read=read):
            read.update(model.metric.readout(target))
            return model.metric(target)

        sft_on_texts(model.target, model.target_tokenizer, [texts[i] for i in idx], phi,
                     dataclasses.replace(inner, batch_size=n), seed + r)
        accs.append(read["pixel_accuracy"])
        decodes += int(read.get("qr_decodes", 0.0))
    return accs, decodes


def flip_table(trials: int, flips: list[int], seed: int) -> None:
    """Decode rate of the tiny config's code and the official one after k random flips."""
    rng = np.random.default_rng(seed)
    print("| code | " + " | ".join(f"{k} wrong" for k in flips) + " |")
    print("| --- |" + " --- |" * len(flips))
    for name, bitmap, text in (("`qr`, text DPG (level H)", qr_bitmap("DPG"), "DPG"),
                               ("`qr_official`", load_bitmap("qr_official"), OFFICIAL_QR_TEXT)):
        cells = []
        for k in flips:
            ok = 0
            for _ in range(trials):
                dark = bitmap.astype(bool)
                dark.flat[rng.choice(dark.size, k, replace=False)] ^= True
                ok += decode_qr(dark) == text
            cells.append(f"{100 * ok / trials:.0f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny/qr_long.yaml")
    ap.add_argument("--length", type=int, default=2, help="characters per candidate example")
    ap.add_argument("--candidates", type=int, default=9025)
    ap.add_argument("--inner-lr", type=float, default=100.0,
                    help="inner SGD lr (scales D; larger = closer to a pure sign objective)")
    ap.add_argument("--batches", default="256,1024,4096", help="SFT batch sizes to sample")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2000, help="Adam steps of the search")
    ap.add_argument("--noisy-batch", type=int, default=0,
                    help="optimize for sampled batches of this size instead of the expectation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", action="store_true", help="only the reader's flip tolerance")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.flips:
        flip_table(100, [0, 2, 4, 6, 8, 10, 12, 16, 20], args.seed)
        return
    model, _, _ = build(args.config)
    inner = model.inner
    inner = dataclasses.replace(inner, optim=dataclasses.replace(inner.optim, lr=args.inner_lr))
    check_preconditions(model, inner)
    start = time.perf_counter()
    texts = candidates(args.length, args.candidates, args.seed)
    rows = inner.tokenize(texts, model.target_tokenizer)
    tokens = (rows.labels != -100).sum(1)
    if not bool((tokens == tokens[0]).all()):
        raise SystemExit("error: candidates tokenize to different lengths; use ASCII only")
    g = patch_gradients(model.target, model.metric, rows)
    linear, real = linear_and_real_phi(model, inner, texts, g, tokens, 256, args.seed)
    if abs(real - linear) > 1e-4 * max(1.0, abs(real)):
        raise SystemExit(f"error: linear model Phi {linear:.6f} != real SFT Phi {real:.6f}")
    torch.manual_seed(args.seed)
    pi = optimize(g, float(tokens[0]), args.inner_lr, model.metric, args.steps, args.noisy_batch)
    expected = args.inner_lr * (pi @ g.reshape(len(g), -1)) / float(tokens[0])
    exp_acc = model.metric.pixel_accuracy(expected.reshape(model.metric.shape))
    entropy = float(-(pi * pi.clamp_min(1e-30).log()).sum())
    print(f"config {args.config}, {len(texts)} candidates of {args.length} characters, "
          f"inner lr {args.inner_lr:g}; linear model Phi {linear:.6f} = real SFT {real:.6f}")
    print(f"best distribution: expected-D pixel accuracy {exp_acc:.3f}, perplexity "
          f"{np.exp(entropy):.1f} examples; top "
          + ", ".join(f"{texts[i]!r} {float(pi[i]):.3f}" for i in pi.argsort(descending=True)[:6]))
    print("| examples per SFT | pixel accuracy mean | min | max | decodes |")
    print("| --- | --- | --- | --- | --- |")
    for n in (int(b) for b in args.batches.split(",")):
        accs, decodes = sampled_readouts(model, inner, texts, pi, n, args.repeats, args.seed)
        print(f"| {n} | {np.mean(accs):.3f} | {min(accs):.3f} | {max(accs):.3f} | "
              f"{decodes}/{args.repeats} |")
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
