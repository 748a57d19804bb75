"""What every layer shares: user-facing errors and checks, seeds, hub reachability (no Lightning).
"""
