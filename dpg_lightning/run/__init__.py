"""A run's lifecycle around Lightning: run directory, checkpoints, stopping, divergence, progress,
threads, preflight.
"""
