"""Worked examples (importable as ``examples.*`` when run from the repository root)."""
