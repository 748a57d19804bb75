"""The observing callbacks, W&B offline logging, and the sample / export commands.

One tiny fit (CSV + offline W&B loggers, every callback, a checkpoint) is shared by the tests
that inspect its outputs, to keep the file fast on a small CPU machine.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
import zxingcpp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from callbacks import (
    LMHeadPatchImage,
    PhiCurvePlot,
    RolloutMetrics,
    SampleWriter,
    StructuredHparams,
)
from callbacks.metrics import VarianceMetric
from callbacks.plots import read_drawn_qr
from callbacks.samples import select_rows
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.dpg.step_output import StepOutput
from dpg_lightning.metrics.patterns import load_bitmap
from dpg_lightning.sample import export_main, sample_main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "intermediate_size": 64}
MODEL = {
    "generator": {**TINY, "seed": 0},
    "target": {**TINY, "seed": 1},
    "inner": {"batch_size": 2, "max_length": 16, "optim": {"name": "sgd", "lr": 1.0}},
    "sampling": {"samples_per_prompt": 2, "max_new_tokens": 8},
    "policy": {"lr": 1e-3},
}
PATCH = (10, 0, 6, 5)  # row, col, height, width
MAX_STEPS = 3


def _module():
    from jsonargparse import ArgumentParser

    from dpg_lightning.module import DPGModule

    parser = ArgumentParser()
    parser.add_class_arguments(DPGModule, "model")
    cfg = parser.parse_object({"model": MODEL})
    return parser.instantiate_classes(cfg).model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step fit with every callback, CSV + offline W&B loggers, and a last checkpoint."""
    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(tmp))
    mp.setenv("WANDB_SILENT", "true")
    target = np.zeros(PATCH[2:])
    target[::2] = 1.0
    np.save(tmp / "target.npy", target)
    L.seed_everything(0)
    cbs = {
        "metrics": RolloutMetrics(),
        "samples": SampleWriter(top_k=1, bottom_k=1, table_every_n_steps=2),
        "curve": PhiCurvePlot(),
        "patch": LMHeadPatchImage(*PATCH, target_image=tmp / "target.npy", every_n_steps=2,
                                  decode_qr=True),
        "hparams": StructuredHparams(),
    }
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    wandb_logger = WandbLogger(project="dpg-test", save_dir=str(tmp), offline=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, log_every_n_steps=1,
        inference_mode=False, check_val_every_n_epoch=None, val_check_interval=2,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        logger=[CSVLogger(tmp, name="csv"), wandb_logger], callbacks=[*cbs.values(), ckpt],
        default_root_dir=tmp,
    )
    prompts = tmp / "prompts.txt"
    prompts.write_text("a\nb c\nhello\n")
    data = PromptDataModule(str(prompts), num_prompts=2, val_num_prompts=2)
    trainer.fit(_module(), datamodule=data)
    wandb_logger.experiment.finish()
    mp.undo()
    yield {"tmp": tmp, "trainer": trainer, "ckpt": tmp / "ckpt" / "last.ckpt",
           "prompts": prompts, "log_dir": Path(trainer.log_dir), **cbs}


def _csv_rows(run) -> list[dict]:
    with open(run["log_dir"] / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_rollout_metrics_are_logged_each_step(run):
    rows = _csv_rows(run)
    reward_rows = [r for r in rows if r.get("rollout/reward_mean")]
    assert len(reward_rows) == MAX_STEPS
    for r in reward_rows:
        lo, mean, hi = (float(r[f"rollout/reward_{k}"]) for k in ("min", "mean", "max"))
        assert lo <= mean <= hi
        assert float(r["rollout/reward_std"]) >= 0
        assert 0 <= float(r["rollout/reward_positive_share"]) <= 1
        assert float(r["time/examples_per_second"]) > 0
        assert r["rollout/advantage_mean"] and r["rollout/completion_chars"]
        # Same window and rows as the module's own per-step value.
        assert float(r["train/reward_mean"]) == pytest.approx(mean, rel=1e-4, abs=1e-7)


def test_metrics_window_aggregates_and_resets():
    cb = RolloutMetrics()
    cb.metrics.to("cpu")
    for values in ([1.0, 3.0], [5.0, -1.0]):
        step = StepOutput(["ab", ""], ["p", "p"], torch.tensor(values), torch.tensor(values))
        cb._update(step, torch.device("cpu"))
    cb._seconds = 2.0
    out = cb.compute_and_reset()
    assert out["rollout/reward_mean"] == pytest.approx(2.0)
    assert out["rollout/reward_std"] == pytest.approx(np.std([1, 3, 5, -1], ddof=1))
    assert (out["rollout/reward_min"], out["rollout/reward_max"]) == (-1.0, 5.0)
    assert out["rollout/reward_positive_share"] == 0.75
    assert out["rollout/empty_share"] == 0.5
    assert out["time/examples_per_second"] == 2.0
    assert cb.compute_and_reset() == {}
    cb._update(StepOutput([], [], torch.tensor([0.5])), torch.device("cpu"))  # no advantages
    out = cb.compute_and_reset()
    assert out["rollout/reward_std"] == 0.0 and "rollout/advantage_mean" not in out
    var = VarianceMetric()
    var.update(torch.tensor([1e6 + 1.0, 1e6 + 3.0]))
    assert float(var.compute()) == pytest.approx(2.0)


def test_sample_writer_jsonl(run):
    path = run["samples"].output_path
    assert path == run["log_dir"] / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 * MAX_STEPS
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3]  # DPG steps, as metrics.csv counts
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        assert (top["rank"], bottom["rank"]) == ("top1", "bottom1")
        assert top["reward"] >= bottom["reward"]
        assert isinstance(top["text"], str) and top["prompt"] in {"a", "b c", "hello"}
        assert isinstance(top["advantage"], float)


def test_select_rows_disjoint_and_nonfinite():
    out = StepOutput(["x", "y", "z"], ["p"] * 3, torch.tensor([0.1, float("nan"), -2.0]))
    rows = select_rows(out, 7, top_k=2, bottom_k=2)
    assert [(r["rank"], r["text"]) for r in rows] == [("top1", "x"), ("top2", "z")]
    assert rows[0]["advantage"] is None
    rows = select_rows(out, 7, top_k=1, bottom_k=5)
    assert [r["text"] for r in rows] == ["x", "z"]


def test_phi_curve_png(run):
    cb = run["curve"]
    assert cb.output_path == run["log_dir"] / "val_phi.png"
    # val_check_interval=2 within 3 steps, and a final validation at the last step (DPG steps)
    assert [s for s, _ in cb.history] == [0, 2, 3]
    with Image.open(cb.output_path) as img:
        assert img.format == "PNG" and img.size == (600, 400)


def test_lm_head_patch_png_has_patch_shape(run):
    cb = run["patch"]
    height, width = PATCH[2:]
    pngs = sorted(cb.output_path.glob("step*.png"))
    # DPG steps 1 (the first), 2 (every_n_steps=2) and 3 (the last).
    assert [p.name for p in pngs] == [f"step{k:06d}{end}.png" for k in (1, 2, 3)
                                      for end in ("", "_vs_target")]
    with Image.open(pngs[0]) as img:
        assert img.size == (width, height)
        assert set(np.unique(np.asarray(img))) <= {0, 127, 255}
    assert cb.last_sign.shape == (height, width)
    assert (cb.last_sign != 0).any(), "one SFT epoch at lr 1 must move the LM head"
    decodes = [json.loads(x) for x in (cb.output_path / "decodes.jsonl").read_text().splitlines()]
    assert [d["step"] for d in decodes] == [1, 2, 3] and not any(d["decodes"] for d in decodes)
    rows = [r for r in _csv_rows(run) if r.get("patch/match")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and 0 <= float(rows[0]["patch/match"]) <= 1
    train = {int(r["step"]) for r in _csv_rows(run) if r.get("train/reward_mean")}
    assert {int(r["step"]) for r in rows} <= train  # the patch sits beside its step's metrics


def test_read_drawn_qr_reads_either_polarity():
    code = zxingcpp.create_barcode("67", zxingcpp.BarcodeFormat.QRCode)
    modules = np.asarray(code.to_image(scale=1, add_quiet_zones=False))
    sign = np.where(modules < 128, 1, -1)  # dark modules drawn as +1
    assert read_drawn_qr(sign) == "67"
    assert read_drawn_qr(-sign) == "67"  # either polarity
    assert read_drawn_qr(np.zeros_like(sign)) is None


def test_lm_head_patch_validates_geometry(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        LMHeadPatchImage(0, 0, 3, 3, target_image=np.zeros((4, 4)))
    with pytest.raises((FileNotFoundError, ValueError)):
        LMHeadPatchImage(0, 0, 3, 3, target_image=tmp_path / "missing.npy")


def test_lm_head_patch_names_a_pattern_image():
    cb = LMHeadPatchImage(100, 0, 6, 7, target_image="67")
    np.testing.assert_array_equal(cb.target_image, load_bitmap("67"))


# ---------------------------------------------------------------- Weights & Biases offline


def _wandb_records(path: Path):
    """Records of a ``.wandb`` file: W&B's LevelDB-style log of protobuf ``Record`` messages.

    wandb 0.31 ships no reader for it (``wandb.sdk.internal.datastore`` is gone): a 7-byte
    header, then 32 KiB blocks of chunks ``crc32 u32 | length u16 | type u8 | payload``
    (type 1 = whole record, 2/3/4 = first/middle/last piece).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += left - 7 - length
            continue
        pieces = payload if kind in (1, 2) else pieces + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def _wandb_history(run) -> tuple[list[dict], dict, Path]:
    (run_dir,) = (run["tmp"] / "wandb").glob("offline-run-*")
    (file,) = run_dir.glob("run-*.wandb")
    history, config = [], {}
    for record in _wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config, run_dir


def test_wandb_offline_run_holds_history(run):
    history, config, run_dir = _wandb_history(run)
    steps = [h["trainer/global_step"] for h in history if "rollout/reward_mean" in h]
    assert steps == [1, 2, 3]  # DPG steps done, as checkpoint names count them
    assert any("train/phi_after_sft" in h for h in history)
    assert any("val/phi" in h for h in history)
    assert any("patch/match" in h for h in history)
    assert config["reward"] == "dpg" and config["sampling"]["samples_per_prompt"] == 2
    tables = [h for h in history if h.get("samples/_type") == "table-file"]
    assert tables, "the SampleWriter table is logged"
    table = json.loads((run_dir / "files" / tables[-1]["samples/path"]).read_text())
    assert table["columns"] == ["step", "rank", "prompt", "text", "reward", "advantage"]
    assert len(table["data"]) == 2 * MAX_STEPS
    assert any(h.get("lm_head_patch/_type") == "images/separated" for h in history)
    assert any("val_phi_curve/_type" in h for h in history)


# ---------------------------------------------------------------- sample / export


@pytest.fixture(scope="module")
def config_file(run):
    path = run["tmp"] / "config.yaml"
    # The sections of the config.yaml that LightningCLI saves in a run directory.
    config = {"seed_everything": 0, "trainer": {"max_steps": MAX_STEPS},
              "model": MODEL, "data": {"prompt_file": str(run["prompts"]), "num_prompts": 2},
              "optimizer": None, "lr_scheduler": None, "ckpt_path": None, "weights_only": None}
    path.write_text(yaml.safe_dump(config))
    return path


def test_sample_writes_n_rows(run, config_file, tmp_path):
    out = tmp_path / "data.jsonl"
    sample_main(["--config", str(config_file), "--ckpt_path", str(run["ckpt"]),
                 "--num_examples", "7", "--output", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7
    assert [r["prompt"] for r in rows] == ["a", "a", "b c", "b c", "hello", "hello", "a"]
    assert all(isinstance(r["text"], str) for r in rows)


def test_export_loads_with_transformers(run, config_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_main(["--config", str(config_file), "--ckpt_path", str(run["ckpt"]),
                       "--output", str(tmp_path / "gen")])
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    state = torch.load(run["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    weight = state["generator.transformer.wte.weight"]
    torch.testing.assert_close(model.get_input_embeddings().weight, weight)
    ids = tokenizer("hi", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out_ids = model.generate(ids, max_new_tokens=3)
    assert out_ids.shape[1] <= ids.shape[1] + 3


def test_sample_requires_checkpoint(config_file, tmp_path):
    with pytest.raises(SystemExit):
        sample_main(["--config", str(config_file), "--num_examples", "1",
                     "--output", str(tmp_path / "x.jsonl")])


# ---------------------------------------------------------------- packaging


def test_wandb_config_builds_loggers_and_callbacks(monkeypatch):
    """The example config parses and instantiates (no training: LightningCLI ``run=False``)."""
    from dpg_lightning.cli import DPGCLI
    from dpg_lightning.module import DPGModule

    monkeypatch.chdir(ROOT)
    cli = DPGCLI(DPGModule, PromptDataModule, run=False,
                 args=["--config", "configs/tiny/l2_norm_wandb.yaml"])
    assert [type(x).__name__ for x in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"RolloutMetrics", "SampleWriter", "PhiCurvePlot", "LMHeadPatchImage",
            "StructuredHparams"} <= names


def test_a_resume_keeps_the_rows_of_the_steps_its_checkpoint_holds(tmp_path):
    """Resumed from a checkpoint after DPG step 3, steps 1-3 stay and 4-5 (redone) go."""
    writer, patch = SampleWriter(), LMHeadPatchImage(*PATCH)
    writer.output_path, patch.output_path = tmp_path / "samples.jsonl", tmp_path
    for path in (writer.output_path, tmp_path / "decodes.jsonl"):
        path.write_text("".join(json.dumps({"step": k}) + "\n" for k in range(1, 6)))
    resumed = SimpleNamespace(global_step=3)
    writer.on_train_start(resumed, None)
    patch.on_train_start(resumed, None)
    for path in (writer.output_path, tmp_path / "decodes.jsonl"):
        assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert [r["step"] for r in writer._rows] == [1, 2, 3]
