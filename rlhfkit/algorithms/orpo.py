"""ORPO: supervised fine-tuning and preference optimisation in one loss, without a reference model (Hong et al.
2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    loss = L_SFT + lambda * L_OR                                                                  (eq. 6)
    L_SFT = -1/|y_c| log pi(y_c|x),   L_OR = -log sigma( log odds(y_c|x) - log odds(y_r|x) )        (eq. 7)
    odds(y|x) = P(y|x) / (1 - P(y|x)),   P(y|x) = exp( 1/|y| log pi(y|x) )                          (eq. 4)

The NLL on the chosen reply teaches the format; the odds-ratio term pushes the rejected reply's odds down
relative to the chosen one's, mildly (its gradient is scaled by 1 - sigma(log odds ratio), eq. 9), so no
reference is needed to keep the policy from degenerating. The loss is `orpo_loss` (rlhfkit/ops/losses.py), run
through DPO's trainer (rlhfkit/algorithms/dpo.py); `orpo.beta` is lambda (TRL's ORPOConfig.beta). docs/methods/orpo.md.

Deviations from Hong et al. (2024):
- The paper runs ORPO on the base model, with no SFT stage. In the pipeline it starts from the run's SFT policy:
  the feedback stage samples the compared replies from that policy, and digits' base model is a random
  initialisation that cannot reply at all. With reward.data (comparisons of your own) and a pretrained
  policy.path, set sft.epochs = 0 and ORPO's NLL term is the only supervised training the policy gets, as in the paper.
- L_SFT is the chosen reply's mean NLL per completion token (eq. 2, prompt excluded), averaged over the batch;
  TRL 1.12's ORPOTrainer takes the token-mean cross-entropy over prompt and reply together.
- AdamW with linear decay to 10% and no warmup (DPO's schedule; the paper: inverse square root, 100 warmup steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms import Method
from rlhfkit.algorithms.dpo import train_dpo
from rlhfkit.algorithms.simpo import validate_reference_free
from rlhfkit.core.config import F
from rlhfkit.data.preferences import preference_files
from rlhfkit.models.runtime import Runtime


@dataclass
class ORPOConfig:
    """[orpo] ORPO on comparisons: NLL on the chosen reply plus an odds-ratio term, without a reference model (rlhfkit/algorithms/orpo.py)."""

    beta: float = F(0.1, "lambda, the weight of the odds-ratio term against the NLL (TRL's ORPOConfig.beta; the paper uses 0.1-0.25).")
    epochs: int = F(2, "Passes over the training comparisons.")
    batch_size: int = F(64, "Comparisons per optimiser step (chosen and rejected go through one forward).")
    lr: float = F(5e-4, "AdamW learning rate (linear decay to 10%); with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    heldout_fraction: float = F(0.1, "Share of items held out to measure the odds-ratio accuracy (the same items as the reward model's at the same seed and fraction).")
    criterion: str = F("", "The criterion of the comparisons learned from (one of feedback.criteria, or of reward.data); empty = reward.criterion.")

    PRETRAINED_LR = (1e-6, 1e-5)  # TRL 1.12's ORPOConfig.learning_rate; x10 for LoRA

    @property
    def loss(self) -> str:
        """The entry of REFERENCE_FREE_LOSSES (rlhfkit/ops/losses.py) the DPO trainer runs."""
        return "orpo"

    def validate(self, cfg, checks) -> None:
        """[orpo]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        validate_reference_free(self, "orpo", checks)


METHOD = Method("orpo", ORPOConfig, ("sft", "feedback"),
                (("NLL of the chosen reply and the odds-ratio term", ("loss/nll", "loss/odds_ratio")),
                 ("implicit reward accuracy", ("rewards/accuracies",)),
                 ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))))


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): ORPO from OUT's SFT policy on the run's
    comparisons (reward.data, else the feedback stage's)."""
    comparisons, _ = preference_files(cfg, out, "orpo")
    return train_dpo(cfg, comparisons, out / "sft" / "model", stage_dir, rt, section="orpo")
