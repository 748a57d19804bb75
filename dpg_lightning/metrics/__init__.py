"""The metric ``Phi(target)`` a run raises: the base class, the shipped metrics, user functions
(no Lightning).
"""
