"""The tiny language heuristic configs (configs/tiny/language_<heuristic>.yaml, heuristic =
levenshtein, fasttext, embedding): each parses and runs one DPG step with `reward: example` on
small local models, shrunk to seconds (no hub: the fastText classifier is studies.compare's,
trained here on the bundled sentences; the embedding model is a random static one saved here)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

HEURISTICS = {
    "levenshtein": "dpg_lightning.example_rewards.levenshtein.TokenLevenshtein",
    "fasttext": "dpg_lightning.example_rewards.fasttext_language.FastTextLanguageID",
    "embedding": "dpg_lightning.example_rewards.embedding.EmbeddingSimilarity",
}
#: What shrinks a tiny language fit to seconds.
SHRINK = [
    "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
    "--model.generator.pretrain_steps=2", "--model.target.pretrain_steps=2",
    "--model.sampling.max_new_tokens=8", "--model.sampling.samples_per_prompt=2",
    "--data.num_prompts=2", "--data.val_num_prompts=2", "--model.inner.batch_size=2",
]


def static_embedding_model(folder: Path) -> Path:
    """A random static-embedding sentence-transformers model (a word vocabulary of the
    bundled sentences), saved to ``folder``."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for f in ("en.txt", "es.txt")
                    for w in (ROOT / "configs/tiny/data" / f).read_text().split()})
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])},
                              unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=8)],
                        device="cpu").save(str(folder))
    return folder


def local_model(name: str, tmp: Path) -> list[str]:
    if name == "fasttext":
        pytest.importorskip("fasttext")
        from studies.compare import train_language_id

        return [f"--model.example_reward.init_args.model={train_language_id(tmp / 'lid.bin')}"]
    if name == "embedding":
        folder = static_embedding_model(tmp / "static")
        return [f"--model.example_reward.init_args.model={folder}"]
    pytest.importorskip("rapidfuzz")
    return []


@pytest.mark.parametrize("name", list(HEURISTICS))
def test_the_config_is_the_language_proxy_with_an_example_reward(name):
    """Only the reward, its arguments and the run folder differ from configs/tiny/language.yaml:
    the same steps, prompts and samples per step (the same number of generated examples)."""
    base = yaml.safe_load((ROOT / "configs/tiny/language.yaml").read_text())
    cfg = yaml.safe_load((ROOT / f"configs/tiny/language_{name}.yaml").read_text())
    assert cfg["model"].pop("reward") == "example" and base["model"].pop("reward") == "dpg"
    assert cfg["model"].pop("example_reward")["class_path"] == HEURISTICS[name]
    for cfg_ in (cfg, base):
        del cfg_["trainer"]["default_root_dir"], cfg_["trainer"]["logger"]["init_args"]["save_dir"]
    assert cfg == base


@pytest.mark.parametrize("name", list(HEURISTICS))
def test_the_config_runs_one_step(name, tmp_path, monkeypatch):
    from dpg_lightning.cli import main

    monkeypatch.chdir(ROOT)  # the configs name their data files from the repository root
    monkeypatch.setattr("sys.argv", ["dpg_lightning"])
    run = tmp_path / "run"
    cli = main(["fit", "--config", f"configs/tiny/language_{name}.yaml", *SHRINK,
                *local_model(name, tmp_path), f"--trainer.default_root_dir={run}",
                f"--trainer.logger.init_args.save_dir={run}"])
    assert cli.model.reward == "example" and cli.trainer.global_step == 1
    assert type(cli.model.example_reward).__module__ + "." + type(
        cli.model.example_reward).__name__ == HEURISTICS[name]
    with open(Path(cli.trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["val/phi"] for r in rows if r.get("val/phi")], "no validation logged"


def test_the_comparison_keeps_each_methods_latest_rows_and_tabulates_them(tmp_path):
    """studies.compare's table: a method run alone (the heuristics at a later commit) replaces
    only its own rows; each method is a column; differing step-0 validations are flagged."""
    from studies.figures import latest_runs, task_figure, write_report

    def row(reward, seed, commit, loss, untrained=3.5):
        curve = [[0, {"last_word_loss": untrained, "es_share": 0.2}],
                 [150, {"last_word_loss": loss, "es_share": 0.5}]]
        return {"task": "language", "reward": reward, "seed": seed, "status": "ok",
                "commit": commit, "config_hash": reward, "wall_s": 1.0, "steps": 150,
                "updates": 150, "examples_per_step": 32, "curve": curve,
                "untrained": curve[0][1], "final": curve[-1][1], "command": f"c {commit}"}

    rows = [row("dpg", s, "old", 9.0) for s in (0, 1)] + [
        row("dpg", s, "a", 3.1) for s in (0, 1)] + [
        row("levenshtein", s, "b", 3.3, untrained=3.5 + s) for s in (0, 1)]
    runs = latest_runs(rows, "language")
    assert [(r["reward"], r["commit"]) for r in runs] == [("dpg", "a")] * 2 + [
        ("levenshtein", "b")] * 2
    report = tmp_path / "tiny_compare.md"
    write_report(rows, report, {"language": (("last_word_loss", "lower"),
                                             ("es_share", "higher"))})
    text = report.read_text()
    assert "| Levenshtein | fastText LID | embedding |" in text
    assert ("| language | last_word_loss | lower | 3.5000 ± 0.0000 | - | 3.1000 ± 0.0000 | "
            "3.3000 ± 0.0000 | - | - |") in text
    assert "seed 1: untrained `last_word_loss` differs between dpg and levenshtein" in text
    assert task_figure("language", runs, (("last_word_loss", "lower"),),
                       tmp_path / "f.png") == tmp_path / "f.png"
