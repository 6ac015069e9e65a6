"""Algorithms layer: the trainers. Each policy-optimisation method is one file here, registered below by one line.

    sft.py, reward.py                  the stages every method starts from (supervised fine-tuning, the reward model)
    classifier.py                      the toxicity classifier (the `toxicity` stage: a reward source, toxicity_score)
    ppo.py, rloo.py, grpo.py           online RL against the reward (on rlhfkit/spine/online.py)
    dpo.py                             directly on the comparisons
    simpo.py, orpo.py                  the same, without a reference model (on dpo.py's trainer)
    best_of_n.py                       no training: the best of N samples
    rejection_sampling.py, rest.py     fine-tuning on the reward's picks (on rlhfkit/spine/self_training.py)
    online_dpo.py                      DPO on pairs sampled from the policy, the reward's best vs worst (likewise)
    sl_cai.py                          Constitutional AI's supervised stage (on rlhfkit/spine/constitution.py)

A method file defines its config section (a dataclass with `validate(cfg, checks)`), `METHOD` (what it reads,
its report curves, ...) and `run(cfg, task, out, stage_dir, rt) -> dict`. Adding a method = adding its file and
its line to REGISTRY: the config section `[NAME]`, the stage directory OUT/NAME/, the CLI subcommand, the
pipeline's wiring and the report all follow from these.

Layer: algorithms. May import: spine, models, data, ops, core (never tasks, feedback, evaluation, labelapp,
pipeline, cli). This module itself stays free of torch: `rlhfkit --help` lists the methods from REGISTRY without
importing their files.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from rlhfkit.core.errors import ConfigError

# name -> one line for `rlhfkit --help` and the docs. The method is rlhfkit/algorithms/<name>.py. Order: the
# pipeline's stage order, `rlhfkit compare`'s, the config's sections and the report's.
REGISTRY: dict[str, str] = {
    "ppo": "optimise the policy against the reward model with PPO (resumes from its checkpoint)",
    "dpo": "optimise the policy directly on the comparisons with DPO (no reward model, no sampling)",
    "kto": "optimise the policy on thumbs up/down (unpaired binary feedback) with KTO (no reward model, no sampling)",
    "rloo": "optimise the policy against the reward model with RLOO: K samples per prompt, leave-one-out baseline, "
            "KL in the reward (no critic; resumes from its checkpoint)",
    "grpo": "optimise the policy against the reward model with GRPO: K samples per prompt, group-normalised "
            "advantages, KL in the loss (no critic; resumes from its checkpoint)",
    "simpo": "optimise the policy on the comparisons with SimPO: length-normalised log-prob as the reward, a target "
             "margin, no reference model",
    "orpo": "fine-tune and optimise the policy on the comparisons in one loss with ORPO: NLL of the chosen reply plus "
            "an odds-ratio term, no reference model",
    "best_of_n": "answer with the best of N samples of the SFT policy by the reward model (no training)",
    "rejection_sampling": "sample K per prompt, fine-tune on each prompt's best by the reward model, for several rounds "
                          "(Llama 2's rejection sampling; resumes at the round it was in)",
    "rest": "ReST: Grow a sample set from the policy, Improve by fine-tuning on it at rising reward thresholds; "
            "repeat (resumes at the iteration it was in)",
    "online_dpo": "online DPO: sample K per prompt from the policy, pair the best and worst by the reward model, "
                  "update with DPO; repeat (resumes at the iteration it was in)",
    "sl_cai": "Constitutional AI's supervised stage: the SFT policy critiques and revises its replies under a "
              "constitution, then is fine-tuned on its revisions (needs a chat template)",
}


@dataclass(frozen=True)
class Method:
    """What a method file declares about itself (its module-level `METHOD`)."""

    name: str  # config section, stage directory, and the policy's name in the evaluation
    config: type  # its config section, a dataclass with validate(cfg, checks)
    needs: tuple[str, ...]  # stages it reads: "sft" and "feedback" (comparisons) and/or "reward" (a reward model);
    # "thumbs": the feedback stage's thumbs, unless its section's `data` names a file (KTO)
    curves: tuple[tuple[str, tuple[str, ...]], ...]  # report panels: (title, logged metrics drawn in it; "gold/*" = all)
    resumable: bool = False  # keeps a checkpoint in its stage directory: an interrupted run's directory is kept
    output: str = "model"  # "model": a policy directory, OUT/NAME/model; "sampler": OUT/NAME/sampler.json (best-of-N)
    step_label: str = ""  # x axis of its curves in the report; empty = "NAME step"
    trains: bool = True  # trains a policy (so [lora] applies); best-of-N does not
    needs_chat: bool = False  # needs a policy with a chat template (SL-CAI): `rlhfkit compare` runs it only when named

    @property
    def module(self) -> str:
        return f"rlhfkit.algorithms.{self.name}"

    @property
    def summary(self) -> str:
        return REGISTRY[self.name]

    def run(self, cfg, task, out, stage_dir, rt) -> dict:
        """The method's stage: its file's run(cfg, task, out, stage_dir, rt)."""
        return importlib.import_module(self.module).run(cfg, task, out, stage_dir, rt)


class _Methods(Mapping):
    """REGISTRY's methods by name: names and membership without importing anything; a method's file is imported
    (with torch) when its Method is first read."""

    def __getitem__(self, name: str) -> Method:
        if name not in REGISTRY:
            raise KeyError(name)
        return importlib.import_module(f"rlhfkit.algorithms.{name}").METHOD

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in REGISTRY


METHODS: Mapping[str, Method] = _Methods()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method = {name!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return METHODS[name]
