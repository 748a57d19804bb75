"""A few seconds of plain next-token pretraining, for the tiny language proxy.

The paper's language experiment starts from Llama-3.2-1B-Instruct, which already speaks the
source and (weakly) the new language. The tiny byte-level models start from random weights, so
the CPU proxy gives them a little of that first, in-process and seeded: the generator reads the
source language plus some of the new one (so it *can* drift there), the target reads only the
source language (so the held-out new-language passages are new to it). This is a proxy of the
paper's setting, not a reproduction: a model trained for seconds learns letter statistics.

Wiring (no download, no checkpoint file): ``ModelConfig.pretrain_files`` / ``pretrain_steps`` /
``pretrain_lr`` name the corpora, and the module calls :func:`maybe_pretrain` right after
``build_model``. ``python -m dpg_lightning.models.pretrain`` runs it stand-alone.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dpg_lightning.data.text_sources import read_lines
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner.steps import per_example_loss
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer


def read_texts(paths: str | list[str]) -> list[str]:
    """Non-empty, stripped lines of one or more corpora (one example per line)."""
    files = [paths] if isinstance(paths, str) else paths
    return [line.strip() for path in files for line in read_lines(path, "pretrain_files")]


def pretrain(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 256,
    start_token: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``texts`` (AdamW, random batches); returns the step losses.

    Examples are tokenized as the model will later read text: a target as the inner SFT
    tokenizes examples (``<start> text <eos>``); a generator, whose rollouts feed prompts without
    a start token, with ``start_token=False`` (else its positions are shifted by one at
    generation time, a distribution it never saw). ``requires_grad``
    flags are restored afterwards (the module freezes the target).
    """
    if steps <= 0:
        return []
    data = tokenize_examples(texts, tokenizer, max_length, start_token=start_token)
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=gen)
            ids = data.input_ids[idx].to(device)
            logits = model(ids, attention_mask=data.attention_mask[idx].to(device)).logits
            loss = per_example_loss(logits.float(), data.labels[idx].to(device)).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return losses


def maybe_pretrain(
    model: nn.Module, tokenizer, cfg: ModelConfig, start_token: bool = True
) -> list[float]:
    """Pretrain ``model`` if ``cfg`` names corpora and steps; else do nothing."""
    if not cfg.pretrain_files or not cfg.pretrain_steps:
        return []
    texts = read_texts(cfg.pretrain_files)
    return pretrain(model, tokenizer, texts, cfg.pretrain_steps, cfg.pretrain_lr, cfg.seed,
                    start_token=start_token)


def main(argv: list[str] | None = None) -> None:
    """Pretrain a tiny byte-level model and report the loss (a quick look at the proxy)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = ModelConfig(seed=args.seed)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, len(tok))
    start = time.perf_counter()
    losses = pretrain(model, tok, read_texts(args.files), args.steps, args.lr, args.seed)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
