"""Reward functions over *text*: each scorer tokenises with its own tokenizer.

Online methods decode the policy's responses and hand (prompt, completion) strings to a scorer, so a
reward model never has to share the policy's tokenizer (and several scorers can be combined later).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.data.batching import encode_completion, encode_prompt, pad_right
from rlhfkit.models import autocast, freeze, load_scalar_model, load_tokenizer, sequence_scores
from rlhfkit.training import Runtime


class RewardModelScorer:
    """A trained reward model directory: score = head output at the last token of prompt + completion + EOS."""

    def __init__(self, path: str | Path, rt: Runtime, batch_size: int = 512):
        self.tokenizer = load_tokenizer(path, "reward model")
        self.model = freeze(load_scalar_model(path, rt.device, "reward model"))
        self.rt, self.batch_size = rt, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """(B,) float32 scores on the run's device."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            seqs = [
                encode_prompt(self.tokenizer, p) + encode_completion(self.tokenizer, c)
                for p, c in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            ]
            ids, mask = pad_right(seqs, self.tokenizer.pad_token_id)
            with autocast(self.rt.device, self.rt.dtype):
                out.append(sequence_scores(self.model, ids.to(self.rt.device), mask.to(self.rt.device)).float())
        return torch.cat(out)
