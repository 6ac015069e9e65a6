"""The `digits` task: the increment language (the full statement: README.md, "The `digits` task").

A prompt is 4 uniform random digits followed by the separator, e.g. "4 5 9 1 =". A completion is 4 digits;
each next digit is (one of the last four digits of the sequence so far, picked uniformly) + 1 mod 10.
The preference to instil: the *first* completion digit is the last prompt digit + 1; later digits keep
following the rule. Under the rule, the preferred first digit appears with probability
E[#copies of the last prompt digit among the 4] / 4 = (1 + 3/10) / 4 = 0.325.
"""

from __future__ import annotations

import math
import random

import numpy as np

from rlhfkit.tasks.base import REWARD_EOS, Task

SEP = "="
N_PROMPT = 4
N_COMPLETION = 4
WINDOW = 4  # the rule looks at the last four digits


def parse_digits(text: str) -> list[int] | None:
    """'6 2 7 8' -> [6, 2, 7, 8]; None if any token is not a digit."""
    tokens = text.split()
    if not all(len(t) == 1 and t.isdigit() for t in tokens):
        return None
    return [int(t) for t in tokens]


def prompt_digits(prompt: str) -> list[int]:
    digits = parse_digits(prompt.replace(SEP, " "))
    if digits is None or len(digits) != N_PROMPT:
        raise ValueError(f"not a digits prompt: {prompt!r}")
    return digits


def follows_rule(history: list[int], digit: int) -> bool:
    """`digit` is (one of the last four digits of `history`) + 1 mod 10."""
    return (digit - 1) % 10 in history[-WINDOW:]


def next_digit_distribution(history: list[int]) -> np.ndarray:
    """(10,) the rule's next-digit probabilities given the sequence so far."""
    p = np.zeros(10)
    for d in history[-WINDOW:]:
        p[(d + 1) % 10] += 1 / WINDOW
    return p


class DigitsTask(Task):
    name = "digits"
    max_new_tokens = N_COMPLETION + 1  # four digits, then EOS
    gold_metric_names = ("preferred_first_rate", "later_rule_validity", "well_formed_rate")

    @property
    def context_length(self) -> int:
        """BOS + the prompt's digits and separator + max_new_tokens + REWARD_EOS: every prompt tokenises to the same
        length (one token per digit, see build_tokenizer), so no tokenizer is needed to know it."""
        return 1 + N_PROMPT + 1 + self.max_new_tokens + REWARD_EOS

    def default_overrides(self) -> dict:
        # DPO's usual beta of 0.1 lets the digits policy drift (seed 0: later validity 0.73, KL 4.4); at 0.5 it
        # keeps the rule (0.996) at a KL of 1.4, like PPO's default (README, "Results").
        # Online DPO over six iterations (seed 0): at beta 0.1 its KL reaches 3.1, two thirds of it after the first
        # digit; at 1.0, 1.95 (share at the first digit 0.57); at 1.5, 1.2-1.7 over seeds 0-2 with 63-82% of it on
        # the first digit, the rule kept (docs/methods/online_dpo.md, "Defaults on digits").
        # KTO likewise (docs/methods/kto.md): at 0.1, seed 0 keeps the rule at 0.928 with KL 2.2; at 0.5, 0.995 with 1.2.
        return {"dpo": {"beta": 0.5}, "online_dpo": {"beta": 1.5, "iterations": 6}, "kto": {"beta": 0.5}}

    def build_tokenizer(self):
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        vocab = {t: i for i, t in enumerate(specials + [SEP] + [str(d) for d in range(10)])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )

    def prompts(self, n: int, rng: random.Random) -> list[str]:
        return [" ".join(str(rng.randrange(10)) for _ in range(N_PROMPT)) + f" {SEP}" for _ in range(n)]

    def demonstrations(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        out = []
        for prompt in self.prompts(n, rng):
            seq = prompt_digits(prompt)
            for _ in range(N_COMPLETION):
                seq.append((rng.choice(seq[-WINDOW:]) + 1) % 10)
            out.append((prompt, " ".join(map(str, seq[N_PROMPT:]))))
        return out

    def judge(self, prompt: str, completion: str) -> tuple[bool, float, bool]:
        """(preferred first digit, share of later digits that follow the rule, well formed)."""
        history = prompt_digits(prompt)
        digits = parse_digits(completion)
        if not digits:
            return False, 0.0, False
        preferred = digits[0] == (history[-1] + 1) % 10
        later_ok = 0
        for i in range(1, N_COMPLETION):
            if i < len(digits) and follows_rule(history + digits[:i], digits[i]):
                later_ok += 1
        return preferred, later_ok / (N_COMPLETION - 1), len(digits) == N_COMPLETION

    def gold_score(self, prompt: str, completion: str) -> float:
        # The preferred first digit is worth as much as a completion whose later digits all follow the rule;
        # a malformed completion (wrong length, non-digits) loses a point. Thirds keep ties exact.
        preferred, validity, well_formed = self.judge(prompt, completion)
        return float(preferred) + round(validity * 3) / 3 - (0.0 if well_formed else 1.0)

    def gold_metrics(self, prompts: list[str], completions: list[str]) -> dict[str, float]:
        judged = [self.judge(p, c) for p, c in zip(prompts, completions, strict=True)]
        n = max(len(judged), 1)
        return {
            "preferred_first_rate": sum(j[0] for j in judged) / n,
            "later_rule_validity": sum(j[1] for j in judged) / n,
            "well_formed_rate": sum(j[2] for j in judged) / n,
        }

    def sft_loss_floor(self) -> float:
        """Mean entropy (nats) per completion token (4 digits + EOS) of the rule, computed exactly.

        The last four digits are the whole state. Start from the uniform distribution over the 10^4
        prompts and push it through the rule four times, adding the expected next-digit entropy each step;
        EOS is deterministic (entropy 0).
        """
        states = np.array(np.meshgrid(*[np.arange(10)] * WINDOW, indexing="ij")).reshape(WINDOW, -1).T  # (10^4, 4)
        weight = np.full(len(states), 1 / len(states))
        index = lambda s: int(((s[0] * 10 + s[1]) * 10 + s[2]) * 10 + s[3])  # noqa: E731
        total = 0.0
        for _ in range(N_COMPLETION):
            new_weight = np.zeros_like(weight)
            for s, w in zip(states, weight):
                if w == 0:
                    continue
                p = next_digit_distribution(list(s))
                total += w * -sum(q * math.log(q) for q in p if q > 0)
                for d in np.nonzero(p)[0]:
                    new_weight[index([s[1], s[2], s[3], d])] += w * p[d]
            weight = new_weight
        return total / (N_COMPLETION + 1)
