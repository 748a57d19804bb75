"""dpg_lightning: Dataset Policy Gradient (Thrush et al., 2026) in PyTorch Lightning.

Core math is importable without Lightning: ``dpg_lightning.inner`` (differentiable SFT and
metagradient rewards), ``advantages``, ``policy``, ``rollout``, ``optim``, ``objectives``.
"""

__version__ = "0.1.0"
