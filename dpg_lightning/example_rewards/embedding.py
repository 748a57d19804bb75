"""The paper's embedding baseline: mean similarity of an example to the target-metric set.

Official definition (``reward_fn_multilingual_embedding`` in the paper's
``custom_metagrad_reward.py``): ``r_i = (1/M) sum_j sim(e(x_i), e(p_j))`` with the
sentence-transformers model ``tomaarsen/static-similarity-mrl-multilingual-v1`` (a static,
multilingual embedding), ``sim`` the model's own ``similarity`` (cosine for that model), the
embeddings unnormalised and full-size, each passage embedded as ``prompt + " " + completion``.
Each example is scored on its own, so per inverse group or per step is the same.

Here the same; the set is embedded once at start-up (the paper re-embeds it every step, which
gives the same numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.example_rewards.base import ExampleReward

#: The paper's embedding model (the hub has since moved it to
#: ``sentence-transformers/static-similarity-mrl-multilingual-v1``; the old name redirects).
PAPER_MODEL = "tomaarsen/static-similarity-mrl-multilingual-v1"


class EmbeddingSimilarity(ExampleReward):
    """``r_i =`` mean similarity between example i's embedding and each passage's.

    Args:
        model: a sentence-transformers model: a hub name (the paper's
            ``tomaarsen/static-similarity-mrl-multilingual-v1``) or a local folder.
        device: where the embedding model runs (a static embedding is fast on CPU).
        batch_size: texts per ``encode`` call.
        truncate_dim: keep the first N dimensions (Matryoshka); default: all (the paper's).
    """

    def __init__(self, model: str = PAPER_MODEL, device: str = "cpu", batch_size: int = 256,
                 truncate_dim: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(model, device=device, truncate_dim=truncate_dim)
        except Exception as err:  # offline, unknown name, not a model folder
            raise ConfigError(
                f"`model.example_reward.init_args.model: {model}` is neither a local "
                f"sentence-transformers folder nor a hub model this machine can load "
                f"({type(err).__name__}: {err}); save {PAPER_MODEL} elsewhere "
                "(`SentenceTransformer(name).save(folder)`) and give the folder"
            ) from None
        self.batch_size = batch_size
        self.reference_embeddings: Any = None

    def _encode(self, texts: Sequence[str]) -> Any:
        return self.model.encode(list(texts), batch_size=self.batch_size,
                                 convert_to_tensor=True, show_progress_bar=False)

    def bind(self, tokenizer: Any, reference_texts: Sequence[str]) -> None:
        self.reference_embeddings = self._encode(reference_texts)

    def __call__(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts: Sequence[str]
    ) -> list[float]:
        if self.reference_embeddings is None:
            raise RuntimeError("EmbeddingSimilarity needs `bind(tokenizer, reference_texts)` "
                               "first")
        scores = self.model.similarity(self._encode(texts), self.reference_embeddings)
        return scores.float().mean(dim=1).tolist()
