"""The planner: memory, storage, FLOPs and time of one DPG step, from shapes alone (no Lightning).
"""
