"""Prompt sources: .txt, .jsonl, .parquet and hub datasets, the template, the validation source.

Every file is written by the test (parquet with pyarrow); the hub path is checked by replacing
``datasets.load_dataset`` (nothing is downloaded). Mistakes must be :class:`ConfigError`s that
name the key, the value and where in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.data.prompts import load_prompts, prompts_digest
from dpg_lightning.data.text_sources import read_entries as read_prompts
from dpg_lightning.data.text_sources import source_kind
from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.run.preflight import check_run

PASSAGES = ["The cat sat.", "Rain fell\non the hills.", "Bees make honey."]


def _jsonl(path: Path, rows: list, field: str = "text") -> str:
    path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return str(path)


def _parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        load_prompts(**kwargs)
    return str(err.value)


# ------------------------------------------------------------------ the three file kinds


def test_txt_reads_as_before(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\\nline\n\n   \nsecond\n")
    sets = load_prompts(str(f), val_num_prompts=3)
    assert sets.train == ["first\nline", "second"]
    assert sets.val == ["first\nline", "second", "first\nline"]  # cycled, as before
    # the digest over unchanged .txt prompts is what older checkpoints recorded
    assert prompts_digest(sets.train) == prompts_digest(["first\nline", "second"])


def test_jsonl_field_and_blank_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"passage": PASSAGES[0]}) + "\n\n" + json.dumps({"passage": PASSAGES[1]}) + "\n"
    )
    assert load_prompts(str(f), prompt_field="passage").train == PASSAGES[:2]


def test_parquet_column_is_read_alone(tmp_path):
    f = _parquet(tmp_path / "p.parquet", {"id": [1, 2, 3], "text": PASSAGES})
    assert load_prompts(f).train == PASSAGES
    g = _parquet(tmp_path / "q.parquet", {"body": pa.array(PASSAGES, pa.large_string())})
    assert read_prompts(g, field="body") == PASSAGES


def test_template_wraps_every_prompt_and_keeps_other_braces(tmp_path):
    f = _parquet(tmp_path / "p.parquet", {"text": PASSAGES[:2]})
    sets = load_prompts(f, prompt_template="Rephrase this article {json: {}}: {text}")
    assert sets.train == [f"Rephrase this article {{json: {{}}}}: {p}" for p in PASSAGES[:2]]
    assert sets.val[0] == sets.train[0]


def test_template_without_text_placeholder_is_an_error(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", PASSAGES)
    msg = _error(prompt_file=f, prompt_template="Rephrase this article: {passage}")
    assert "data.prompt_template" in msg and "{passage}" in msg and "{text}" in msg


# ------------------------------------------------------------------ the validation source


def test_separate_validation_source_with_template(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", PASSAGES)
    val = _parquet(tmp_path / "val.parquet", {"text": ["held out A", "held out B"]})
    sets = load_prompts(train, val_num_prompts=3, val_prompt_file=val, prompt_template="R: {text}")
    assert sets.train == [f"R: {p}" for p in PASSAGES]
    assert sets.val == ["R: held out A", "R: held out B", "R: held out A"]


def test_validation_source_errors_name_its_key(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", PASSAGES)
    msg = _error(prompt_file=train, val_prompt_file=str(tmp_path / "nowhere.jsonl"))
    assert "data.val_prompt_file" in msg and "nowhere.jsonl" in msg
    msg = _error(prompt_file=train, val_prompt_split="validation")
    assert "data.val_prompt_split" in msg and "data.val_prompt_file" in msg


def test_data_module_serves_train_and_validation_prompts(tmp_path):
    train = _parquet(tmp_path / "train.parquet", {"text": PASSAGES})
    val = _jsonl(tmp_path / "val.jsonl", ["v1", "v2"])
    dm = PromptDataModule(train, num_prompts=2, val_num_prompts=2, val_prompt_file=val,
                          prompt_template="Rephrase: {text}")
    assert next(iter(dm.val_dataloader())) == ["Rephrase: v1", "Rephrase: v2"]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and all(p.startswith("Rephrase: ") for p in batch)
    state = dm.state_dict()
    assert state["prompts_sha256"] == prompts_digest([f"Rephrase: {p}" for p in PASSAGES])
    # a different template is a different stream: the resume check refuses it
    other = PromptDataModule(train, num_prompts=2, prompt_template="Summarize: {text}")
    with pytest.raises(ConfigError, match="training prompts"):
        other.load_state_dict(state)


def test_preflight_checks_the_new_data_settings(tmp_path):
    train = _parquet(tmp_path / "train.parquet", {"text": PASSAGES})
    check_run({"data": {"prompt_file": train, "prompt_template": "Rephrase: {text}"}})
    with pytest.raises(ConfigError, match="data.prompt_field"):
        check_run({"data": {"prompt_file": train, "prompt_field": "passage"}})


# ------------------------------------------------------------------ mistakes in files


def test_jsonl_mistakes_name_file_line_and_key(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "oops",\n')
    msg = _error(prompt_file=str(f))
    assert "data.prompt_file" in msg and str(f) in msg and "line 2" in msg and "JSON" in msg
    f.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    msg = _error(prompt_file=str(f))
    assert "line 3" in msg and "data.prompt_field: text" in msg and "body" in msg
    f.write_text('{"text": "fine"}\n{"text": 42}\n')
    msg = _error(prompt_file=str(f))
    assert "line 2" in msg and "data.prompt_field: text" in msg and "int" in msg
    f.write_text('["text", "fine"]\n')
    assert "line 1" in _error(prompt_file=str(f))


def test_parquet_mistakes_name_the_column_or_row(tmp_path):
    f = _parquet(tmp_path / "p.parquet", {"passage": PASSAGES, "id": [1, 2, 3]})
    msg = _error(prompt_file=f)
    assert "data.prompt_field: text" in msg and "passage, id" in msg and f in msg
    msg = _error(prompt_file=f, prompt_field="id")
    assert "data.prompt_field: id" in msg and "int64" in msg
    g = _parquet(tmp_path / "nulls.parquet", {"text": ["a", None, "c"]})
    msg = _error(prompt_file=g)
    assert "row 1" in msg and "NoneType" in msg
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet at all")
    assert "cannot be read as parquet" in _error(prompt_file=str(bad))


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.parquet"])
def test_missing_file(tmp_path, name):
    msg = _error(prompt_file=str(tmp_path / name))
    assert "data.prompt_file" in msg and name in msg and "does not exist" in msg


def test_empty_sources(tmp_path):
    (tmp_path / "e.txt").write_text("\n \n")
    (tmp_path / "e.jsonl").write_text("\n")
    blank = _jsonl(tmp_path / "blank.jsonl", ["", "   "])
    empty = _parquet(tmp_path / "e.parquet", {"text": pa.array([], pa.string())})
    for f in (str(tmp_path / "e.txt"), str(tmp_path / "e.jsonl"), blank, empty):
        msg = _error(prompt_file=f)
        assert "data.prompt_file" in msg and "empty" in msg, f


def test_unknown_extensions_and_implausible_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("not a hub name: the hub must not be asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    Path("prompts.csv").write_text("a,b\n")
    Path("folder").mkdir()
    for source, words in [
        ("prompts.csv", ["prompts.csv", ".csv file", ".parquet"]),  # exists, unsupported
        ("folder", ["folder", "directory"]),
        ("data/prompts.csv", ["data/prompts.csv", "not a hub dataset name"]),  # a file name
        ("prompts", ["prompts", "not a hub dataset name"]),  # no org/name
        ("./org/name", ["./org/name", "not a hub dataset name"]),
        ("a/b/c", ["a/b/c", "not a hub dataset name"]),
    ]:
        msg = _error(prompt_file=source)
        assert "data.prompt_file" in msg and all(w in msg for w in words), (source, msg)
    assert source_kind("wikimedia/wikipedia") == "hub"
    assert source_kind("teknium/OpenHermes-2.5") == "hub"
    assert source_kind("DATA.PARQUET") == "parquet"


# ------------------------------------------------------------------ hub datasets (no network)


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering from an in-memory dataset, recording its calls."""
    calls = []

    def load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        if path == "org/missing":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return datasets.Dataset.from_dict(
            {"title": ["t"] * 2, "text": [f"{path}:{split}:0", f"{path}:{split}:1"]}
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_name_goes_to_load_dataset(fake_hub):
    sets = load_prompts("wikimedia/wikipedia", prompt_split="train[:2]",
                        prompt_config="20231101.en", prompt_template="Rephrase: {text}")
    assert fake_hub == [("wikimedia/wikipedia", "20231101.en", "train[:2]", {})]
    assert sets.train == ["Rephrase: wikimedia/wikipedia:train[:2]:0",
                          "Rephrase: wikimedia/wikipedia:train[:2]:1"]


def test_hub_validation_split_defaults_to_the_training_split(fake_hub):
    load_prompts("org/train", val_prompt_file="org/val", val_num_prompts=1)
    assert [(c[0], c[2]) for c in fake_hub] == [("org/train", "train"), ("org/val", "train")]
    fake_hub.clear()
    sets = load_prompts("org/train", val_prompt_file="org/val", val_prompt_split="test",
                        val_num_prompts=1)
    assert [(c[0], c[2]) for c in fake_hub] == [("org/train", "train"), ("org/val", "test")]
    assert sets.val == ["org/val:test:0"]


def test_hub_mistakes(fake_hub):
    msg = _error(prompt_file="org/data", prompt_field="passage")
    assert "data.prompt_field: passage" in msg and "title, text" in msg and "org/data" in msg
    msg = _error(prompt_file="org/missing")
    assert "data.prompt_file: org/missing" in msg and "doesn't exist" in msg
    msg = _error(prompt_file="org/data", val_prompt_file="org/missing", val_prompt_split="dev")
    assert "data.val_prompt_file: org/missing" in msg and "data.val_prompt_split: dev" in msg


def test_preflight_says_at_once_that_the_hub_is_unreachable(fake_hub, monkeypatch):
    from dpg_lightning.run import preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1") as err:
        check_run({"data": {"prompt_file": "wikimedia/wikipedia"}})
    assert "data.prompt_file: wikimedia/wikipedia" in str(err.value) and fake_hub == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache may have it: datasets decides
    check_run({"data": {"prompt_file": "wikimedia/wikipedia"}})
    assert [c[0] for c in fake_hub] == ["wikimedia/wikipedia"]
