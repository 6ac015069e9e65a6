"""Evaluation of policies on held-out prompts, and the report."""
