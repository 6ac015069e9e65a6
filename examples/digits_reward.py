"""A reward written as a Python function: a rule check on the `digits` task, no reward model (README, "Rewards as
Python functions"; docs/methods/reward.md).

    rlhfkit run --set method=grpo --set 'reward.sources=[{kind="python", function="examples/digits_reward.py:rule_reward"}]' \
        --set ppo.value_init=policy --out runs/grpo-rule

A completion earns 1 when it is four digits, its first digit is the prompt's last digit + 1 (mod 10), and each
later digit is one of the four digits before it + 1 (mod 10); anything else earns 0: a binary, verifiable reward
(the seeds' "a reward can be binary (0 or 1) or scalar"). It is written from the task's statement (README, "The
`digits` task"), not from rlhfkit's gold scorer, as a user would write one.
"""


def _digits(text: str) -> list[int] | None:
    tokens = text.replace("=", " ").split()
    return [int(t) for t in tokens] if tokens and all(len(t) == 1 and t.isdigit() for t in tokens) else None


def rule_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0 for a completion that follows the rule and starts with the preferred digit, else 0.0."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        history, digits = _digits(prompt), _digits(completion)
        ok = history is not None and digits is not None and len(digits) == 4 and digits[0] == (history[-1] + 1) % 10
        for i in range(1, 4) if ok else ():
            seen = (history + digits[:i])[-4:]
            ok = ok and (digits[i] - 1) % 10 in seen
        rewards.append(1.0 if ok else 0.0)
    return rewards
