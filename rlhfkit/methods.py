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
    curves: tuple[tuple[str, tuple[str, ...]], ...]  # report panels: (title, logged metrics drawn in it; "gold/*" = all)
    summary: str  # one line for `rlhfkit --help` and the docs
    resumable: bool = False  # keeps a checkpoint in its stage directory: an interrupted run's directory is kept
    output: str = "model"  # "model": a policy directory, OUT/NAME/model; "sampler": OUT/NAME/sampler.json (best-of-N)
    step_label: str = ""  # x axis of its curves in the report; empty = "NAME step"


METHODS: dict[str, Method] = {
    "ppo": Method("ppo", "rlhfkit.algorithms.ppo", ("sft", "reward"),
                  (("reward-model score", ("objective/scores",)), ("KL(policy || reference), nats", ("objective/kl_k1",))),
                  "optimise the policy against the reward model with PPO (resumes from its checkpoint)", resumable=True),
    "dpo": Method("dpo", "rlhfkit.algorithms.dpo", ("sft", "feedback"),
                  (("implicit reward margin (chosen - rejected)", ("rewards/margins",)),
                   ("implicit reward accuracy", ("rewards/accuracies",)),
                   ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))),
                  "optimise the policy directly on the comparisons with DPO (no reward model, no sampling)"),
    "rloo": Method("rloo", "rlhfkit.algorithms.rloo", ("sft", "reward"),
                   (("reward-model score", ("objective/scores",)), ("gold metrics on the rollouts", ("gold/*",)),
                    ("KL(policy || reference), nats", ("objective/kl_k1",))),
                   "optimise the policy against the reward model with RLOO: K samples per prompt, leave-one-out "
                   "baseline, KL in the reward (no critic; resumes from its checkpoint)", resumable=True),
    "grpo": Method("grpo", "rlhfkit.algorithms.grpo", ("sft", "reward"),
                   (("reward-model score", ("objective/scores",)), ("gold metrics on the rollouts", ("gold/*",)),
                    ("KL(policy || reference), nats", ("objective/kl_k1",))),
                   "optimise the policy against the reward model with GRPO: K samples per prompt, group-normalised "
                   "advantages, KL in the loss (no critic; resumes from its checkpoint)", resumable=True),
    "best_of_n": Method("best_of_n", "rlhfkit.algorithms.best_of_n", ("sft", "reward"),
                        (("reward-model score of the best of n", ("objective/scores",)),
                         ("gold metrics of the best of n (the truth)", ("gold/*",))),
                        "answer with the best of N samples of the SFT policy by the reward model (no training)",
                        output="sampler", step_label="n (samples per prompt)"),
    "rejection_sampling": Method(
        "rejection_sampling", "rlhfkit.algorithms.rejection_sampling", ("sft", "reward"),
        (("reward-model score: sampled set and kept winners", ("objective/scores", "selection/kept_scores")),
         ("gold metrics of the sampled set", ("gold/*",)),
         ("KL(policy || reference) of the sampled set, nats", ("objective/kl_k1",))),
        "sample K per prompt, fine-tune on each prompt's best by the reward model, for several rounds (Llama 2's "
        "rejection sampling; resumes at the round it was in)", resumable=True, step_label="round"),
    "rest": Method(
        "rest", "rlhfkit.algorithms.rest", ("sft", "reward"),
        (("reward-model score: Grow set, threshold and kept", ("objective/scores", "selection/threshold",
                                                                "selection/kept_scores")),
         ("gold metrics of the Grow set", ("gold/*",)),
         ("KL(policy || reference) of the Grow set, nats", ("objective/kl_k1",))),
        "ReST: Grow a sample set from the policy, Improve by fine-tuning on it at rising reward thresholds; "
        "repeat (resumes at the iteration it was in)", resumable=True, step_label="Improve step"),
}


def get_method(name: str) -> Method:
    from rlhfkit.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"method = {name!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return METHODS[name]
