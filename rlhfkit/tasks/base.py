"""What a built-in task provides to the pipeline."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

# One position past prompt + max_new_tokens: a decoder reward model scores prompt + reply + EOS
# (rlhfkit/models/scoring.py), so a reply cut at max_new_tokens, after the longest prompt, needs one more. Without
# it, courtesy's PPO crashed in the reward model's position embedding on the first such reply.
REWARD_EOS = 1


class Task(ABC):
    """A task: prompts, demonstrations for SFT, a gold scorer for simulated labelers, gold metrics."""

    name: str
    max_new_tokens: int  # response budget when sampling
    gold_metric_names: tuple[str, ...]  # keys of gold_metrics(), in report order
    criteria: tuple[str, ...] = ("overall",)  # what its simulated labelers judge (feedback.criteria picks among them)

    @abstractmethod
    def build_tokenizer(self):
        """A transformers tokenizer built locally (no download)."""

    @abstractmethod
    def prompts(self, n: int, rng: random.Random) -> list[str]:
        """n prompt strings."""

    @abstractmethod
    def demonstrations(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        """n (prompt, completion) pairs for SFT."""

    def prompt_fields(self, prompt) -> dict:
        """A prompt's other fields (a prompt file's record beyond 'prompt' and 'item_id'), which Python reward
        functions get as keyword arguments; a task that generates its prompts has none."""
        return {}

    def heldout_prompts(self, n: int, rng: random.Random) -> list[str]:
        """n evaluation prompts (a task that generates prompts draws them from the evaluation's own stream)."""
        return self.prompts(n, rng)

    def sft_split(self, n: int, rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """SFT's training demonstrations and the held-out ones its loss is measured on."""
        return self.demonstrations(n, rng), self.demonstrations(max(256, n // 20), rng)

    @abstractmethod
    def gold_score(self, prompt: str, completion: str) -> float:
        """The true objective that simulated labelers rank by (higher is better; equal scores tie)."""

    def criterion_score(self, prompt: str, completion: str, criterion: str) -> float:
        """The true objective of one criterion (one of `criteria`) that simulated labelers of it rank by; a task
        with one criterion ranks by gold_score."""
        return self.gold_score(prompt, completion)

    @abstractmethod
    def gold_metrics(self, prompts: list[str], completions: list[str]) -> dict[str, float]:
        """Task-specific metrics of sampled completions, averaged over the batch."""

    @property
    def context_length(self) -> int:
        """Positions a model needs for this task: the longest prompt in tokens (BOS included), plus
        max_new_tokens, plus REWARD_EOS. This default measures sampled prompts with the task's tokenizer; a task
        whose prompt length is fixed computes it directly (the config checks it without building a tokenizer)."""
        tokenizer = self.build_tokenizer()
        prompts = self.prompts(256, random.Random(0))
        return max(len(tokenizer(p)["input_ids"]) for p in prompts) + self.max_new_tokens + REWARD_EOS

    def sft_loss_floor(self) -> float | None:
        """The lowest achievable mean SFT loss per completion token (the task's entropy), if known."""
        return None

    def toxicity_examples(self, n: int, rng: random.Random) -> list[tuple[str, int]] | None:
        """n replies labelled 1 (toxic) or 0 (not toxic) by the task's gold rule, for the toxicity classifier
        ([toxicity]); None: the task has no such rule (give labelled texts in toxicity.data instead)."""
        return None

    def default_overrides(self) -> dict:
        """Config values this task sets by default, as {section: {field: value}}."""
        return {}

    def pretrained_overrides(self) -> dict:
        """Config values this task sets when the policy is a pretrained model of yours (policy.path), on top of
        default_overrides and of the defaults the model brings (learning rates, sampling), as {section: {field:
        value}}; what you set wins over both."""
        return {}
