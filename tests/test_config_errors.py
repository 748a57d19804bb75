"""Every setting that needs no model is checked while the config is parsed, before anything is
built: the run exits with status 2 and one line that names the key, without a traceback.

Each case runs the real CLI in-process with model building replaced by a function that fails
the test, so "before any model is built" is checked, not assumed. One case also runs as a
subprocess to see exactly what a user sees (no traceback on stderr) and how long it takes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpg_lightning import module
from dpg_lightning.cli import main
from dpg_lightning.common.errors import ConfigError
from dpg_lightning.inner.steps import trainable_names
from dpg_lightning.metrics.base import check_metric
from dpg_lightning.run import preflight
from tests.helpers import tiny, tiny_fit_args

CONFIG = "configs/tiny/l2_norm.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(module, "build_model", refuse)
    monkeypatch.setattr(module, "load_tokenizer", refuse)


def _fails(capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, *overrides])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    return {k: str(tmp_path / f) for k, f in
            (("empty", "empty.txt"), ("latin1", "latin1.txt"), ("not_a_model", "not_a_model"))}


CASES = [
    # (overrides, the words the message must contain)
    (["--data.prompt_file=does/not/exist.txt"], ["data.prompt_file", "does/not/exist.txt"]),
    (["--data.prompt_file={empty}"], ["data.prompt_file", "empty"]),
    (["--data.prompt_file={latin1}"], ["data.prompt_file", "UTF-8"]),
    (["--data.num_prompts=0"], ["data.num_prompts", "0"]),
    (["--model.inner.batch_size=0"], ["model.inner.batch_size", "0"]),
    (["--model.inner.batch_size=64"], ["model.inner.batch_size", "64", "32 examples"]),
    (["--model.sampling.samples_per_prompt=0"], ["model.sampling.samples_per_prompt"]),
    (["--model.inner.optim.lr=-0.1"], ["model.inner.optim.lr", "-0.1"]),
    (["--model.inner.optim.lr=0"], ["model.inner.optim.lr"]),
    (["--model.policy.lr=-1e-4"], ["model.policy.lr", "-0.0001"]),
    (["--model.sampling.max_new_tokens=0"], ["model.sampling.max_new_tokens"]),
    (["--model.inner.max_length=2"], ["model.inner.max_length", "2", "text token"]),
    (["--model.inner.train_params=layers.[1"], ["model.inner.train_params", "regular expression"]),
    (["--model.policy.num_iterations=2", "--model.policy.epsilon=null"],
     ["model.policy.num_iterations", "model.policy.epsilon"]),
    (["--trainer.accelerator=gpu"], ["trainer.accelerator", "gpu"]),
    (["--model.generator.pretrained=./models/nowhere"],
     ["model.generator.pretrained", "./models/nowhere", "does not exist"]),
    (["--model.target.pretrained={not_a_model}"],
     ["model.target.pretrained", "not a transformers model directory"]),
    (["--model.inner.backend=replay", "--model.inner.autocast=bf16"], ["model.inner.autocast"]),
    (["--model.inner.replay.k=0"], ["model.inner.replay.k"]),
    (["--model.seed=-1"], ["model.seed", "-1"]),
]


@pytest.mark.parametrize("overrides, words", CASES, ids=[c[0][0] for c in CASES])
def test_bad_setting_fails_before_any_model(overrides, words, no_models, capsys, tmp_path):
    files = _files(tmp_path)
    err = _fails(capsys, *(o.format(**files) for o in overrides))
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_hub_name_offline_fails_at_once(no_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: pytest.fail("probed"))
    err = _fails(capsys, "--model.generator.pretrained=meta-llama/Llama-3.2-1B-Instruct")
    assert "model.generator.pretrained" in err and "HF_HUB_OFFLINE" in err


def test_hub_name_without_network_fails_at_once(no_models, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: False)
    err = _fails(capsys, "--model.target.pretrained=openai-community/gpt2")
    assert "model.target.pretrained" in err and "cannot be reached" in err


@pytest.mark.slow
def test_what_a_user_sees(tmp_path):
    """The real command: exit status 2, the message, no traceback, in parse time (the same
    run with ``--print_config`` is the yardstick: nothing is built either way)."""
    base = [sys.executable, "-m", "dpg_lightning", "fit", "--config", CONFIG]
    start = time.perf_counter()
    printed = subprocess.run([*base, "--print_config"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
    parse_time = time.perf_counter() - start
    assert printed.returncode == 0, printed.stderr[-2000:]
    start = time.perf_counter()
    bad = subprocess.run([*base, "--model.inner.optim.lr=-1"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    elapsed = time.perf_counter() - start
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "`model.inner.optim.lr` is -1.0" in bad.stderr
    assert elapsed < 3 * parse_time + 10, (elapsed, parse_time)


@pytest.mark.parametrize("override, key", [
    ("--model.target.num_heads=3", "model.target.num_heads"),
    ("--model.val_sampling.top_p=2", "model.val_sampling.top_p"),
    ("--model.inner.replay.k=0", "model.inner.replay.k"),
])
def test_the_cli_prefixes_a_dataclass_error_with_its_place(override, key, no_models, capsys):
    """The dataclasses say ``num_heads`` / ``top_p`` / ``replay.k``; the CLI knows where they
    sit (the same ModelConfig serves generator and target, SamplingConfig two places)."""
    err = _fails(capsys, override)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"`{key}" in err, err


PARSER_CASES = [
    # jsonargparse's own errors, said as the project's: (overrides, the words, did-you-mean)
    (["--model.inner.optim.nmae=1"], ["`model.inner.optim.nmae`", "'1'"],
     "`model.inner.optim.name`"),
    (["--model.inner.batch_size=abc"], ["`model.inner.batch_size`", "'abc'", "int"], None),
    (["--model.metric.class_path=nope.Nope"], ["`model.metric.class_path`", "nope.Nope",
                                               "LMHeadL2Norm"], None),
    (["--model.inner.backend=hihger"], ["`model.inner.backend`", "'hihger'", "func"],
     "`higher`"),
    (["--model.reward=dpgg"], ["`model.reward`", "'dpgg'", "dataset"], "`dpg`"),
    (["--trainer.max_stepz=3"], ["`trainer.max_stepz`"], "`trainer.max_steps`"),
    (["--model.nmae=1"], ["`model.nmae`", "metric", "policy"], None),
    (["--model.metric.init_args.foo=1"], ["`model.metric.foo`", "LMHeadL2Norm"], None),
    (["--model.inner=3"], ["`model.inner`", "batch_size"], None),
    (["--config={yaml}"], ["`model.inner.optim.nmae`"], "`model.inner.optim.name`"),
    # Lightning's flags that a DPG run does not use
    (["--optimizer=AdamW"], ["`optimizer`", "`model.policy.lr`", "`model.policy.weight_decay`"],
     None),
    (["--lr_scheduler", "StepLR"], ["`lr_scheduler`", "`model.policy"], None),
    (["--optimizer.lr=0.1"], ["`optimizer.lr`", "`model.policy.lr`"], None),
    (["--config={opt_yaml}"], ["`optimizer`", "torch.optim.Adam"], None),
    (["--trainer.gradient_clip_val=0.5"], ["`trainer.gradient_clip_val`", "0.5",
                                           "`model.policy.max_grad_norm`"], None),
    (["--trainer.accumulate_grad_batches=4"], ["`trainer.accumulate_grad_batches`", "4"], None),
]


@pytest.mark.parametrize("overrides, words, guess", PARSER_CASES,
                         ids=[c[0][0] for c in PARSER_CASES])
def test_parser_errors_are_one_line(overrides, words, guess, no_models, capsys, tmp_path):
    """A typo'd key, a wrong type, an unknown choice or class: one line with the key, the value
    and the fix (no usage, no Union report), exit 2, like the project's own checks."""
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("model:\n  inner:\n    optim:\n      nmae: 1\n")
    opt_yaml = tmp_path / "opt.yaml"
    opt_yaml.write_text("optimizer:\n  class_path: torch.optim.Adam\n")
    err = _fails(capsys, *(o.format(yaml=yaml_file, opt_yaml=opt_yaml) for o in overrides))
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Union" not in err and "usage" not in err
    for word in words:
        assert word in err, (word, err)
    if guess:
        assert f"did you mean {guess}?" in err, err


def test_help_still_prints_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--model.inner" in capsys.readouterr().out


@pytest.mark.slow
def test_a_typo_is_one_line_for_the_user():
    """The real command: jsonargparse's error for a typo'd nested key is one line, status 2."""
    bad = subprocess.run(
        [sys.executable, "-m", "dpg_lightning", "fit", "--config", CONFIG,
         "--model.inner.optim.nmae=1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines == ["error: `model.inner.optim.nmae` is not a setting (given '1'); "
                     "did you mean `model.inner.optim.name`?"], bad.stderr[-3000:]


def test_a_metric_without_gradient_path_is_a_config_error(capsys, tmp_path):
    """check_metric runs once the models exist: its refusal is still one line naming
    `model.metric` (and the fix, `model.inner.train_params`), status 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, *tiny_fit_args(root=tmp_path),
              "--model.inner.train_params=ln_f"])  # LMHeadL2Norm reads the (frozen) LM head
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: `model.metric` (LMHeadL2Norm) has no gradient path"), err
    assert "`model.inner.train_params: all`" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("phi, words", [
    (lambda t: t.lm_head.weight.sum(1), "scalar"),
    (lambda t: t.lm_head.weight.detach().sum(), "no gradient path"),
    (lambda t: t.lm_head.weight.sum() * float("nan"), "finite"),
])
def test_check_metric_names_the_key(phi, words):
    target = tiny("gpt2")
    with pytest.raises(ConfigError, match=words) as info:
        check_metric(phi, target, trainable_names(target, "all"))
    assert info.value.key == "metric" and info.value.exit_code == 2
    assert str(info.value.at("model")).startswith("`model.metric`")


def test_a_saved_config_with_null_optimizer_still_loads(capsys, tmp_path):
    """Runs saved ``optimizer: null`` / ``lr_scheduler: null`` in their config.yaml: resuming
    from it must not trip the refusal of a real optimizer."""
    saved = tmp_path / "config.yaml"
    saved.write_text("optimizer: null\nlr_scheduler: null\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--config", str(saved), "--print_config"])
    assert exit_info.value.code == 0
    assert "model:" in capsys.readouterr().out
