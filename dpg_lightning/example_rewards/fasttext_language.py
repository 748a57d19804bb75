"""The paper's fastText baseline: the probability that an example is in the set's language.

Official definition (``reward_fn_fasttext_lang_id`` in the paper's ``custom_metagrad_reward.py``):
the set's language is fastText's top label for *all* its passages joined by spaces (each
``prompt + " " + completion``, newlines replaced by spaces), and ``r_i`` is the probability
fastText gives that label for example i's text (newlines replaced by spaces), read from the
full distribution (``k`` = every label). The model is ``facebook/fasttext-language-identification``
(``model.bin``, 217 languages, labels such as ``__label__spa_Latn``). No normalisation; each
example is scored on its own, so per inverse group or per step is the same.

Here the same, with the passages joined as they are (the paper's ``prompt + " " + completion``
puts two spaces before the last word, which fastText's whitespace tokenizer ignores), and an
option to name the language instead of detecting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.example_rewards.base import ExampleReward

#: The paper's language-identification model (a hub repository holding ``model.bin``).
PAPER_MODEL = "facebook/fasttext-language-identification"
LABEL_PREFIX = "__label__"


def load_fasttext(model: str, filename: str = "model.bin") -> Any:
    """A fastText model from a local file, or ``filename`` of hub repository ``model``."""
    import fasttext

    path = Path(model).expanduser()
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo_id=model, filename=filename))
        except Exception as err:  # offline, unknown repository, no such file
            raise ConfigError(
                f"`model.example_reward.init_args.model: {model}` is neither a local file nor "
                f"a hub model this machine can download ({type(err).__name__}); download "
                f"{filename} of {PAPER_MODEL} elsewhere and give its path"
            ) from None
    return fasttext.load_model(str(path))


def _one_line(text: str) -> str:
    """fastText predicts one line: it rejects newlines (the paper replaces them by spaces)."""
    return text.replace("\n", " ")


class FastTextLanguageID(ExampleReward):
    """``r_i = P(language of the target-metric set | example i)`` under a fastText classifier.

    Args:
        model: a local ``.bin`` file, or a hub repository (the paper's
            ``facebook/fasttext-language-identification``).
        filename: the file in the hub repository.
        language: the set's label (``spa_Latn`` or ``__label__spa_Latn``); default: detected
            from the set as the paper does.
    """

    def __init__(self, model: str = PAPER_MODEL, filename: str = "model.bin",
                 language: str | None = None) -> None:
        self.model = load_fasttext(model, filename)
        self.language: str | None = None
        if language is not None:
            label = language if language.startswith(LABEL_PREFIX) else LABEL_PREFIX + language
            if label not in self.model.labels:
                raise ConfigError(
                    f"`model.example_reward.init_args.language: {language}` is not a label of "
                    f"the fastText model; use one of e.g. {', '.join(self.model.labels[:5])}"
                )
            self.language = label

    def bind(self, tokenizer: Any, reference_texts: Sequence[str]) -> None:
        if self.language is None:
            (labels,), _ = self.model.predict([_one_line(" ".join(reference_texts))], k=1)
            self.language = labels[0]

    def __call__(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts: Sequence[str]
    ) -> list[float]:
        if self.language is None:
            raise RuntimeError("FastTextLanguageID needs `bind(tokenizer, reference_texts)` first")
        labels, probs = self.model.predict([_one_line(t) for t in texts], k=-1, threshold=0.0)
        return [float(dict(zip(lab, p)).get(self.language, 0.0))
                for lab, p in zip(labels, probs)]
