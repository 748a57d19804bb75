"""One full DPG step at the paper's shapes: time and peak memory per phase, beside `plan`'s.

The paper-scale path (chat-templated prompts, chunked rollouts, micro-batched inner SFT with
the ``replay`` backend on disk, rewards, a PPO update of an fp32-master / bf16-compute
generator) rehearsed as one real step of ``python -m dpg_lightning fit``, phase by phase
(``benchmarks.phase_meter.PhaseMeter``), with the planner's prediction for the same config
printed next to it. Nothing is downloaded: models are built from config with random weights at
the real shapes, and tokenizers are byte-level (the target's logits still have GPT-2's 50257 rows).

* ``--scale cpu`` (default; tens of minutes on a 2-core CPU): target GPT-2-124M-shaped
  (vocabulary 50257, 128 tokens per example), generator a Llama-architecture model shrunk to
  fit the CPU with a Llama-3-style chat template, inner AdamW as in the paper (betas 0.9/0.95,
  eps 1e-8, eps_root 1e-9, wd 1e-4), an inner batch of 64 in micro-batches of 8, 4 PPO updates.
* ``--scale paper --device cuda``: the same at the paper's QR/67 shapes on one GPU: generator
  Llama-3.2-1B-shaped, 256 prompts x 4 samples, an inner batch of 1024 in micro-batches of 128.

Usage::

    python -m benchmarks.rehearsal                        # CPU, writes runs/rehearsal/cpu/
    python -m benchmarks.rehearsal --scale paper --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: A Llama-3-style chat template (the shape of Llama-3.2-Instruct's, without its date logic).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

SCALES = {
    "smoke": dict(  # seconds: checks the script itself
        generator=dict(arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                       intermediate_size=64, max_position_embeddings=512),
        target=dict(arch="gpt2", hidden_size=32, num_layers=1, num_heads=2,
                    intermediate_size=64, max_position_embeddings=512, vocab_size=1000),
        num_prompts=4, batch=16, micro=4, minibatch_prompts=2, generation_batch_size=8,
    ),
    "cpu": dict(
        generator=dict(arch="llama", hidden_size=256, num_layers=4, num_heads=4,
                       intermediate_size=1024, max_position_embeddings=1024),
        target=dict(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12,
                    intermediate_size=3072, max_position_embeddings=1024, vocab_size=50257),
        num_prompts=16, batch=64, micro=8, minibatch_prompts=4, generation_batch_size=32,
    ),
    "paper": dict(
        generator=dict(arch="llama", hidden_size=2048, num_layers=16, num_heads=32,
                       intermediate_size=8192, max_position_embeddings=2048, vocab_size=128256),
        target=dict(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12,
                    intermediate_size=3072, max_position_embeddings=1024, vocab_size=50257),
        num_prompts=256, batch=1024, micro=128, minibatch_prompts=32, generation_batch_size=256,
    ),
}


def chat_tokenizer(directory: Path) -> Path:
    """The byte tokenizer with Llama-3's special tokens and chat template, saved locally."""
    from dpg_lightning.models.build import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(directory)
    return directory


def write_config(scale: str, device: str, out: Path) -> Path:
    s = SCALES[scale]
    updates = s["num_prompts"] // s["minibatch_prompts"]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1,
            "precision": "bf16-mixed", "max_steps": updates, "limit_val_batches": 0,
            "enable_progress_bar": False, "enable_checkpointing": False, "logger": False,
            "default_root_dir": str(out),
            "callbacks": [{"class_path": "benchmarks.phase_meter.PhaseMeter",
                           "init_args": {"output": str(out / "phases.json")}}],
        },
        "model": {
            "generator": {**s["generator"], "dtype": "float32",
                          "tokenizer": str(chat_tokenizer(out / "tokenizer"))},
            "target": {**s["target"], "dtype": "float32", "seed": 1},
            "inner": {
                "batch_size": s["batch"], "micro_batch_size": s["micro"], "max_length": 128,
                "backend": "replay", "micro_batch_reduction": "sum_of_means",
                "loss_normalization": "max_length", "end_token_target": False,
                "replay": {"storage": "disk", "directory": str(out / "replay")},
                "optim": {"name": "adamw", "lr": 5e-6, "betas": [0.9, 0.95], "eps": 1e-8,
                          "eps_root": 1e-9, "weight_decay": 1e-4},
            },
            "sampling": {"samples_per_prompt": 4, "temperature": 1.0, "top_p": 1.0,
                         "max_new_tokens": 128, "chat_template": "on",
                         "generation_batch_size": s["generation_batch_size"]},
            "policy": {"baseline": "group", "epsilon": 0.2, "dual_clip": 3.0,
                       "minibatch_prompts": s["minibatch_prompts"],
                       "loss_aggregation": "token_mean", "lr": 5e-6, "weight_decay": 0.01,
                       "max_grad_norm": 1.0},
            "metric": {"class_path": "dpg_lightning.metrics.l2_norm.LMHeadL2Norm"},
        },
        "data": {"prompt_file": str(ROOT / "configs/tiny/data/rephrase_prompts.txt"),
                 "prompt_template": "Rephrase this article: {text}",
                 "num_prompts": s["num_prompts"], "val_num_prompts": 1},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output directory (default runs/rehearsal/..)")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # freed buffers back to the OS, so the resident set follows tensors
        from benchmarks.harness import reexec_with_malloc_env

        reexec_with_malloc_env("benchmarks.rehearsal", sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DPG_NUM_THREADS", str(args.threads))
    out = Path(args.out or ROOT / "runs" / "rehearsal" / f"{args.scale}_{args.device}")
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(args.scale, args.device, out)
    gpus = ["--gpus", "1"] if args.device == "cuda" else ["--gpus", "1", "--gpu-memory", "23"]
    plan = subprocess.run([sys.executable, "-m", "dpg_lightning", "plan", "--config",
                           str(config), *gpus], capture_output=True, text=True, cwd=ROOT)
    (out / "plan.txt").write_text(plan.stdout + plan.stderr)
    print(plan.stdout[-6000:] or plan.stderr[-3000:], flush=True)
    import torch

    from benchmarks.phase_meter import _status
    from dpg_lightning.cli import main as cli_main

    baseline = torch.cuda.memory_allocated() if args.device == "cuda" else _status("VmRSS")
    os.environ["PHASE_METER_BASELINE"] = str(baseline)
    start = time.perf_counter()
    cli_main(["fit", "--config", str(config)])
    total = time.perf_counter() - start
    rows = json.loads((out / "phases.json").read_text())
    print(f"\nmeasured ({args.scale}, {args.device}, {total:.0f} s for the whole command; "
          f"baseline before any model: {baseline / 2**20:.0f} MiB):")
    print("| phase | seconds | peak MiB above the baseline |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['phase']} | {row['seconds']:.1f} | {row['peak_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
