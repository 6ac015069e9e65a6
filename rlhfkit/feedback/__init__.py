"""Feedback: labelers (simulated, human via rlhfkit.labelapp), consensus and agreement."""
