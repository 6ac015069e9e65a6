"""SimPO: preference optimisation without a reference model (Meng et al. 2024, "SimPO: Simple Preference
Optimization with a Reference-Free Reward").

    loss = -log sigma( beta/|y_c| log pi(y_c|x) - beta/|y_r| log pi(y_r|x) - gamma )          (eq. 6)

The implicit reward is the policy's mean log-prob per completion token times beta (eq. 4): the length
normalisation matches the reward to how the policy generates (mean log-likelihood) and keeps longer replies from
winning by length; gamma > 0 asks the chosen reply to win by a margin (eq. 5). There is no reference: nothing
but the policy in memory, no reference forward, no cache. The loss is `simpo_loss` (rlhfkit/ops/losses.py), run
through DPO's trainer (rlhfkit/algorithms/dpo.py: the same comparisons, held-out split, batches, optimiser and
held-out accuracy); docs/methods/simpo.md.

Deviations from Meng et al. (2024):
- Starts from the SFT policy of the run (the paper's "Base" setting trains an SFT model on UltraChat first, the
  same recipe); AdamW with linear decay to 10% and no warmup, DPO's schedule (the paper: cosine, 10% warmup).
- Without a reference nothing holds the policy near SFT but the loss's saturation and the training budget: the
  KL to SFT is measured by the evaluation, not bounded by the loss.
- Defaults on a tiny model trained from scratch (digits): beta 2.0 and gamma 1.0 (gamma / beta = 0.5, the paper's
  recommended ratio, Sec. 4), lr 5e-4; with policy.path, lr 1e-6 (TRL's CPOConfig default), x10 with LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms import Method
from rlhfkit.algorithms.dpo import train_dpo
from rlhfkit.core.config import F
from rlhfkit.data.preferences import preference_files
from rlhfkit.models.runtime import Runtime


@dataclass
class SimPOConfig:
    """[simpo] SimPO on comparisons, from the SFT policy, without a reference model (rlhfkit/algorithms/simpo.py)."""

    beta: float = F(2.0, "beta: scale of the implicit reward beta * (mean log-prob per completion token); the paper uses 2.0-2.5 (up to 10).")
    gamma: float = F(1.0, "Target reward margin: the chosen reply's implicit reward must exceed the rejected one's by gamma before the loss lets go; the paper's gamma / beta is about 0.5.")
    epochs: int = F(2, "Passes over the training comparisons.")
    batch_size: int = F(64, "Comparisons per optimiser step (chosen and rejected go through one forward).")
    lr: float = F(5e-4, "AdamW learning rate (linear decay to 10%); with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    heldout_fraction: float = F(0.1, "Share of items held out to measure implicit-reward accuracy (the same items as the reward model's at the same seed and fraction).")
    criterion: str = F("", "The criterion of the comparisons learned from (one of feedback.criteria, or of reward.data); empty = reward.criterion.")

    PRETRAINED_LR = (1e-6, 1e-5)  # TRL 1.12's CPOConfig.learning_rate (SimPO is its loss_type "simpo"); x10 for LoRA

    @property
    def loss(self) -> str:
        """The entry of REFERENCE_FREE_LOSSES (rlhfkit/ops/losses.py) the DPO trainer runs."""
        return "simpo"

    def validate(self, cfg, checks) -> None:
        """[simpo]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        validate_reference_free(self, "simpo", checks)
        checks.need(self.gamma >= 0, "simpo.gamma", "must be >= 0 (a target margin; 0 = none)")


def validate_reference_free(section, name: str, checks) -> None:
    """The rules SimPO's and ORPO's sections share (they run the same trainer)."""
    need = checks.need
    need(section.beta > 0, f"{name}.beta", "must be > 0")
    checks.at_least_one(f"{name}.epochs", f"{name}.batch_size")
    checks.positive(f"{name}.lr")
    need(section.max_grad_norm >= 0, f"{name}.max_grad_norm", "must be >= 0 (0 disables the clip)")
    need(0.0 < section.heldout_fraction < 1.0, f"{name}.heldout_fraction", "must be in (0, 1)")
    need(section.criterion != "*", f"{name}.criterion", "a policy learns one preference: name one criterion")


METHOD = Method("simpo", SimPOConfig, ("sft", "feedback"),
                (("implicit reward margin (chosen - rejected)", ("rewards/margins",)),
                 ("implicit reward accuracy", ("rewards/accuracies",)),
                 ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))))


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): SimPO from OUT's SFT policy on the run's
    comparisons (reward.data, else the feedback stage's)."""
    comparisons, _ = preference_files(cfg, out, "simpo")
    return train_dpo(cfg, comparisons, out / "sft" / "model", stage_dir, rt, section="simpo")
