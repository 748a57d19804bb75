"""The DPG step as plain functions: rollout, rewards, advantages, the policy loss (no Lightning).
"""
