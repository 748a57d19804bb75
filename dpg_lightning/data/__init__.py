"""Data sources and tokenization: prompts, text files and hub datasets, the target's row format
(no Lightning).
"""
