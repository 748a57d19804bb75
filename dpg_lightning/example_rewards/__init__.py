"""Per-example rewards that need no inner SFT: ``model.reward: example``.

DPG's reward is the exact metagradient of the target metric; the paper's LAMBADA baselines
replace it with a cheap score of each example against the target-metric set (the passages in
the target language). Such a score is an :class:`~dpg_lightning.example_rewards.base.ExampleReward`:
bound once to the target tokenizer and the metric's texts, then called on a step's texts.

- :mod:`.base`: the interface, a wrapper for a plain (TRL-shaped) function, the start-up check.
- :mod:`.levenshtein`: minus the mean token edit distance to the set (``rapidfuzz``).
- :mod:`.fasttext_language`: the probability of the set's language (``fasttext``).
- :mod:`.embedding`: the mean cosine similarity to the set (``sentence-transformers``).

The three heuristics need the optional extra ``pip install 'dpg_lightning[heuristics]'``; each
imports its library only when built, so the core runs without it.
"""
