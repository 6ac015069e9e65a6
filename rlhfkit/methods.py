"""The policy-optimisation methods the pipeline can run, one line each (`method = "ppo"` in the config).

A method is one file in rlhfkit/algorithms/ with a `run(cfg, task, out, stage_dir, rt) -> dict` function;
registering it here tells the pipeline what it reads and the report what to plot. Its config section,
its stage directory (OUT/<name>/) and its key under `eval` in summary.json all carry its name.
Kept free of torch so that reading a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # config section, stage directory, and the policy's name in the evaluation
    module: str  # the algorithm file, which defines run(cfg, task, out, stage_dir, rt) -> dict
    needs: tuple[str, ...]  # stages it reads: "sft" and "feedback" (comparisons) and/or "reward" (a reward model)
    curves: tuple[tuple[str, tuple[str, ...]], ...]  # report panels: (title, logged metrics drawn in it)
    summary: str  # one line for `rlhfkit --help` and the docs


METHODS: dict[str, Method] = {
    "ppo": Method("ppo", "rlhfkit.algorithms.ppo", ("sft", "reward"),
                  (("reward-model score", ("objective/scores",)), ("KL(policy || reference), nats", ("objective/kl_k1",))),
                  "optimise the policy against the reward model with PPO (resumes from its checkpoint)"),
    "dpo": Method("dpo", "rlhfkit.algorithms.dpo", ("sft", "feedback"),
                  (("implicit reward margin (chosen - rejected)", ("rewards/margins",)),
                   ("implicit reward accuracy", ("rewards/accuracies",)),
                   ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))),
                  "optimise the policy directly on the comparisons with DPO (no reward model, no sampling)"),
}


def get_method(name: str) -> Method:
    from rlhfkit.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"method = {name!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return METHODS[name]
