"""Evaluation of policies on held-out prompts, and the report.

Layer: tasks | feedback | evaluation (independent siblings). May import: algorithms, spine, models, data, ops,
core.
"""
