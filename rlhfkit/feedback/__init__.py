"""Feedback: labelers (simulated; people through rlhfkit.labelapp), agreement, Elo.

Layer: tasks | feedback | evaluation (independent siblings). May import: algorithms, spine, models, data, ops,
core.
"""
