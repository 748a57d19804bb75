"""Per-example rewards (``dpg_lightning.example_rewards``): the interface, its start-up check,
and the paper's three heuristics on small local models built here (no hub access).

Expected values are computed by hand: edit distances are exact counts, a cosine of a text with
itself is 1, and a fastText classifier trained here on two languages prefers the right one.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpg_lightning.common.errors import ConfigError, RunError
from dpg_lightning.example_rewards.base import (
    ExampleReward,
    FunctionReward,
    check_example_reward,
    reference_texts_of,
    score_examples,
)
from dpg_lightning.example_rewards.levenshtein import TokenLevenshtein
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.metrics.likelihood import LastWordLikelihood

ROOT = Path(__file__).resolve().parents[1]
SPANISH = ["el gato come pescado en la casa", "la casa del perro es muy grande",
           "el perro y el gato duermen en la cama", "me gusta leer libros por la noche"]
ENGLISH = ["the cat eats fish in the house", "the house of the dog is very big",
           "the dog and the cat sleep in the bed", "i like to read books at night"]


# ------------------------------------------------------------------ interface and check

def length_reward(prompts, completions, completion_ids, **kwargs):
    """A TRL-shaped reward: the number of generator tokens of each completion."""
    return [float(len(ids)) for ids in completion_ids]


def test_plain_function_gets_trl_keywords_and_the_reference_set(tokenizer):
    seen = {}

    def reward(prompts, completions, completion_ids, reference_texts, tokenizer, **kwargs):
        seen.update(prompts=prompts, refs=reference_texts, tok=tokenizer, kwargs=kwargs)
        return [float(len(c)) - len(reference_texts) for c in completions]

    fn = FunctionReward(reward, kwargs={"weight": 2})
    fn.bind(tokenizer, ["abc", "de"])
    assert score_examples(fn, ["x", "yyyy"], [[1], [2, 3]], ["p", "q"]).tolist() == [-1.0, 2.0]
    assert seen == {"prompts": ["p", "q"], "refs": ["abc", "de"], "tok": tokenizer,
                    "kwargs": {"weight": 2}}
    assert FunctionReward(length_reward)(["ab", "c"], [[5, 6, 7], []], ["", ""]) == [3.0, 0.0]


def test_function_reward_by_import_path_and_a_bad_path(tokenizer):
    fn = FunctionReward("numpy.ones_like")  # imports; a class or a missing name does not
    assert fn.__name__ == "numpy.ones_like"
    with pytest.raises(ImportError, match="no 'nothing_here'"):
        FunctionReward("numpy.nothing_here")
    with pytest.raises(ConfigError, match="is a class"):
        FunctionReward("collections.OrderedDict")


def test_check_returns_one_finite_float_per_example_and_binds(tokenizer):
    class Counting(ExampleReward):
        def bind(self, tokenizer, reference_texts):
            self.refs = list(reference_texts)

        def __call__(self, texts, token_ids, prompts):
            return torch.tensor([float(len(ids)) for ids in token_ids])

    reward = Counting()
    values = check_example_reward(reward, tokenizer, ["ab", "cde", "f"])
    assert reward.refs == ["ab", "cde", "f"]
    # the default start-up examples: the first two references and a text of no set
    assert values == [2.0, 3.0, float(len("A text of no set."))]


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda texts, ids, prompts: [1.0], "returned 1 values for 3 examples"),
        (lambda texts, ids, prompts: [1.0, math.nan, 0.0], "non-finite"),
        (lambda texts, ids, prompts: ["a", "b", "c"], "one number per example"),
        (lambda texts, ids, prompts: 1 / 0, "ZeroDivisionError"),
        ("not a function", "not callable"),
    ],
    ids=["count", "nan", "strings", "raises", "not-callable"],
)
def test_check_says_what_to_fix(fn, match, tokenizer):
    with pytest.raises(ConfigError, match=match):
        check_example_reward(fn, tokenizer, ["ab", "cd"])


def test_a_wrong_count_mid_run_is_a_run_error():
    with pytest.raises(RunError, match="2 values for 1 examples"):
        score_examples(lambda texts, ids, prompts: [0.0, 1.0], ["a"], [[1]], [""])


def test_the_reference_set_is_the_language_metrics_passages(tmp_path):
    passages = tmp_path / "passages.txt"
    passages.write_text("el gato come pescado\nla casa es grande\nel perro duerme bien\n")
    metric = LastWordLikelihood(passages_file=str(passages), max_passages=2)
    assert reference_texts_of(metric) == ["el gato come pescado", "la casa es grande"]
    with pytest.raises(ConfigError, match="LMHeadL2Norm.*has none"):
        reference_texts_of(LMHeadL2Norm())


# ------------------------------------------------------------------ Levenshtein

def test_levenshtein_is_minus_the_mean_token_edit_distance(tokenizer):
    """Byte tokenizer: one token per character, start token = eos (it has no bos)."""
    reward = TokenLevenshtein()
    reward.bind(tokenizer, ["ab", "abc"])
    eos = tokenizer.eos_token_id
    assert reward.reference_ids[0] == [eos, *tokenizer.encode("ab", add_special_tokens=False),
                                       eos]
    # "ab":  [s a b]   vs [s a b e]: 1 insertion; vs [s a b c e]: 2 insertions
    # "xyz": [s x y z] vs [s a b e]: 3 substitutions; vs [s a b c e]: 3 + 1 insertion
    assert reward(["ab", "xyz"], [[], []], ["", ""]) == [-1.5, -3.5]
    bare = TokenLevenshtein(start_token=False, reference_end_token=False)
    bare.bind(tokenizer, ["ab", "abc"])
    assert bare(["ab", "", "abc"], [[], [], []], ["", "", ""]) == [-0.5, -2.5, -0.5]


# ------------------------------------------------------------------ fastText

@pytest.fixture(scope="module")
def fasttext_file(tmp_path_factory) -> Path:
    """A two-language fastText classifier trained on a tiny labelled file (the paper's
    model's label format)."""
    fasttext = pytest.importorskip("fasttext")
    folder = tmp_path_factory.mktemp("fasttext")
    lines = [f"__label__spa_Latn {s}" for s in SPANISH] + [f"__label__eng_Latn {s}"
                                                           for s in ENGLISH]
    (folder / "train.txt").write_text("\n".join(lines * 10) + "\n")
    model = fasttext.train_supervised(str(folder / "train.txt"), epoch=50, lr=0.5, dim=16,
                                      minn=2, maxn=4, thread=1, verbose=0)
    model.save_model(str(folder / "model.bin"))
    return folder / "model.bin"


def test_fasttext_rewards_the_sets_language(fasttext_file):
    from dpg_lightning.example_rewards.fasttext_language import FastTextLanguageID

    reward = FastTextLanguageID(str(fasttext_file))
    reward.bind(None, SPANISH[:2])
    assert reward.language == "__label__spa_Latn"  # detected from the joined set
    spanish, english = reward(["el perro come\nen la casa", "the dog eats\nin the house"],
                              [[], []], ["", ""])
    assert 0.5 < spanish <= 1.0 and 0.0 <= english < 0.5
    forced = FastTextLanguageID(str(fasttext_file), language="eng_Latn")
    forced.bind(None, SPANISH)  # a named language is kept
    assert forced(["the dog eats in the house"], [[]], [""])[0] == pytest.approx(1 - english,
                                                                                abs=1e-4)


def test_fasttext_names_a_bad_language_or_model(fasttext_file, tmp_path, monkeypatch):
    from dpg_lightning.example_rewards.fasttext_language import FastTextLanguageID

    with pytest.raises(ConfigError, match="not a label"):
        FastTextLanguageID(str(fasttext_file), language="deu_Latn")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="neither a local file"):
        FastTextLanguageID(str(tmp_path / "missing" / "model.bin"))


# ------------------------------------------------------------------ embeddings

@pytest.fixture(scope="module")
def static_model(tmp_path_factory) -> tuple[Path, torch.Tensor, dict[str, int]]:
    """A random static-embedding sentence-transformers model saved to a folder, with its
    embedding matrix and vocabulary (a word-level tokenizer)."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for s in SPANISH + ENGLISH for w in s.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    static = StaticEmbedding(tok, embedding_dim=8)
    folder = tmp_path_factory.mktemp("static")
    SentenceTransformer(modules=[static], device="cpu").save(str(folder))
    return folder, static.embedding.weight.detach().clone(), vocab


def test_embedding_reward_is_the_mean_cosine(static_model):
    from dpg_lightning.example_rewards.embedding import EmbeddingSimilarity

    folder, weights, vocab = static_model
    reward = EmbeddingSimilarity(str(folder))

    def embed(text: str) -> np.ndarray:  # a static embedding: the mean of its words' rows
        return weights[[vocab[w] for w in text.split()]].mean(0).numpy()

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    refs = SPANISH[:2]
    reward.bind(None, refs)
    same, other = reward([refs[0], ENGLISH[2]], [[], []], ["", ""])
    assert same == pytest.approx((1.0 + cos(embed(refs[0]), embed(refs[1]))) / 2, abs=1e-5)
    expected = np.mean([cos(embed(ENGLISH[2]), embed(r)) for r in refs])
    assert other == pytest.approx(expected, abs=1e-5)
    reward.bind(None, [refs[0]])
    assert reward([refs[0]], [[]], [""])[0] == pytest.approx(1.0, abs=1e-5)


def test_embedding_names_a_model_it_cannot_load(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from dpg_lightning.example_rewards.embedding import EmbeddingSimilarity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="neither a local"):
        EmbeddingSimilarity(str(tmp_path / "no_model_here"))


# ------------------------------------------------------------------ configs

HEURISTIC_CONFIGS = sorted((ROOT / "configs" / "paper").glob("language_*.yaml"))
HEURISTIC_CONFIGS = [p for p in HEURISTIC_CONFIGS
                     if p.stem not in ("language_baseline", "language_sgd")]


def test_there_is_a_config_per_heuristic():
    assert {p.stem for p in HEURISTIC_CONFIGS} == {
        "language_levenshtein", "language_fasttext", "language_embedding"}


@pytest.mark.parametrize("path", HEURISTIC_CONFIGS, ids=lambda p: p.stem)
def test_heuristic_configs_name_a_reward_and_its_arguments(path):
    """Each heuristic config selects ``reward: example`` with a class whose signature takes its
    ``init_args``, and keeps the language metric (the reference set and val/phi)."""
    m = yaml.safe_load(path.read_text())["model"]
    assert m["reward"] == "example"
    module, _, name = m["example_reward"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, ExampleReward)
    inspect.signature(cls).bind(**m["example_reward"].get("init_args", {}))
    assert m["metric"]["class_path"].endswith("LastWordLikelihood")
    assert m["policy"]["advantage_normalization"] == "grpo_official"
    assert m["policy"]["reward_scale"] == 1
