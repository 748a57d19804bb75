"""dpg_lightning: Dataset Policy Gradient (Thrush et al., 2026) in PyTorch Lightning.

Core math is importable without Lightning: ``inner`` (differentiable SFT and metagradient
rewards), ``dpg`` (the step: rollout, rewards, advantages, policy), ``metrics``,
``example_rewards`` (per-example rewards with no inner SFT), ``analysis`` (how well rewards
track leave-one-out effects), ``models``, ``data``, ``planning``, ``common``. The Lightning
shell is the top-level modules (``module``, ``datamodule``, ``cli``, ``plan``, ``sample``,
``config_parser``) and ``run``.
"""

__version__ = "0.1.0"
