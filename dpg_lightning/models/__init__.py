"""Generator and target: their config, building or loading them, optional tiny pretraining (no
Lightning).
"""
