"""Does the tiny UUID task's DPG reward prefer the UUID itself? (issue 16)

The paper's claim is that the *generator* learns to write the UUID. A policy gradient climbs
toward whatever examples earn the most reward, so a first check comes before any training:
within one SFT batch, is the exact UUID the example with the highest ``r_i = dPhi/deps_i``? This
script builds the module exactly as the CLI does, puts a mixed batch through one real DPG
attribution (the config's inner SFT and ``Phi``), and prints each kind's mean reward relative to
the exact UUID (``+0.50``: half again the exact UUID's reward). The batch:

- ``exact``: the UUID; ``exact, twice``: it twice in one example;
- ``first half`` / ``second half`` of it;
- ``shuffled``: its 32 hex characters permuted, in UUID format (right letters, wrong places);
- ``random UUID``: random hex in UUID format;
- ``top-3 characters``: the UUID's three most frequent characters repeated to its length;
- ``English``: the tiny prompts (text unrelated to the UUID).

Rewards are averaged over ``--orders`` shuffles of the batch, since where an example sits in
the inner SFT's order changes its reward. ``--pretrain-target`` first pretrains the target on
random UUIDs (seeded; none shares a 4-gram with the target UUID), the setting in which the
format is known and only the characters are not.

    python -m studies.uuid_reward_probe
    python -m studies.uuid_reward_probe --pretrain-target 300 --inner-lr 0.03
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
import yaml

from benchmarks.dpg_step import build_from
from dpg_lightning.inner import RankOrder, inner_order
from dpg_lightning.inner.attribution import metagradient_rewards

ROOT = Path(__file__).resolve().parents[1]
HEX = "0123456789abcdef"


def uuid_format(chars: str) -> str:
    return f"{chars[:8]}-{chars[8:12]}-{chars[12:16]}-{chars[16:20]}-{chars[20:32]}"


def random_uuids(n: int, avoid: str, rng: random.Random) -> list[str]:
    """``n`` random UUIDs, none sharing a 4-gram with ``avoid``."""
    grams = {avoid[i:i + 4] for i in range(len(avoid) - 3)}
    out: list[str] = []
    while len(out) < n:
        u = uuid_format("".join(rng.choice(HEX) for _ in range(32)))
        if not any(u[i:i + 4] in grams for i in range(len(u) - 3)):
            out.append(u)
    return out


def probe_batch(uuid: str, english: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """(kind, text) pairs: 4 of each fixed text, 12 of each random kind."""
    hexes = uuid.replace("-", "")
    top = "".join(c for c, _ in Counter(hexes).most_common(3))
    half = len(uuid) // 2
    fixed = {"exact": uuid, "exact, twice": f"{uuid} {uuid}", "first half": uuid[:half],
             "second half": uuid[half:], "top-3 characters": (top * len(uuid))[: len(uuid)]}
    batch = [(k, t) for k, t in fixed.items() for _ in range(4)]
    batch += [("shuffled", uuid_format("".join(rng.sample(hexes, len(hexes)))))
              for _ in range(12)]
    batch += [("random UUID", u) for u in random_uuids(12, uuid, rng)]
    batch += [("English", t) for t in english[:12]]
    return batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny/uuid.yaml")
    ap.add_argument("--pretrain-target", type=int, default=0, metavar="STEPS",
                    help="pretrain the target this many steps on 400 random UUIDs first")
    ap.add_argument("--inner-lr", type=float, default=None)
    ap.add_argument("--inner-batch-size", type=int, default=None)
    ap.add_argument("--train-params", default=None, help="override model.inner.train_params")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    raw = yaml.safe_load((ROOT / args.config).read_text())
    uuid = raw["model"]["metric"]["init_args"]["text"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrain_target:
            corpus = Path(tmp) / "uuids.txt"
            corpus.write_text("\n".join(random_uuids(400, uuid, rng)) + "\n")
            raw["model"]["target"].update(pretrain_files=[str(corpus)],
                                          pretrain_steps=args.pretrain_target)
        if args.inner_lr is not None:
            raw["model"]["inner"]["optim"]["lr"] = args.inner_lr
        if args.inner_batch_size is not None:
            raw["model"]["inner"]["batch_size"] = args.inner_batch_size
        if args.train_params is not None:
            raw["model"]["inner"]["train_params"] = args.train_params
        model, _, _ = build_from(raw)
    english = [line.strip() for line in (ROOT / raw["data"]["prompt_file"]).read_text()
               .splitlines() if line.strip()]
    batch = probe_batch(uuid, english, rng)
    kinds, texts = zip(*batch, strict=True)
    rows = model.inner.tokenize(list(texts), model.target_tokenizer)
    per_kind: dict[str, list[float]] = {}
    phis = []
    for k in range(args.orders):
        order = inner_order(len(rows), model.inner.batch_size, True, args.seed + k)
        scored = metagradient_rewards(model.target, rows, model.metric, model.inner,
                                      RankOrder(order))
        rewards, phi = scored.rewards, scored.phi
        phis.append(float(phi))
        for kind, r in zip(kinds, rewards.tolist(), strict=True):
            per_kind.setdefault(kind, []).append(r)
    exact = statistics.mean(per_kind["exact"])
    print(f"config {args.config}, target pretrained {args.pretrain_target} steps on random "
          f"UUIDs, inner lr {model.inner.optim.lr:g}, inner batch {model.inner.batch_size}, "
          f"train_params {model.inner.train_params}, {len(rows)} examples, {args.orders} orders; "
          f"Phi after SFT {statistics.mean(phis):.4f}")
    print("| example | mean reward | above the exact UUID, in units of its reward |")
    print("| --- | --- | --- |")
    for kind, values in sorted(per_kind.items(), key=lambda kv: -statistics.mean(kv[1])):
        mean = statistics.mean(values)
        print(f"| {kind} | {mean:+.3e} | {(mean - exact) / abs(exact):+.2f} |")


if __name__ == "__main__":
    main()
