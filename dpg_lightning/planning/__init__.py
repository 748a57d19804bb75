"""The planner: memory, storage, FLOPs and time of one DPG step, from shapes alone (no Lightning).

``inputs`` (what a plan is computed from, built from a parsed config) -> ``estimate`` (the
step's numbers, from ``cost``'s terms and ``shapes``) -> ``fit`` (against a ``machine``; the
knobs to turn come from ``search``) and ``render`` (the text). The ``plan`` command
(:mod:`dpg_lightning.plan`) only parses arguments and chooses the machine.
"""
