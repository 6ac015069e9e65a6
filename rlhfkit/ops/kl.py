"""KL divergence between the policy and the reference, estimated per token from sampled text.

With samples y ~ pi and the log-ratio lr = log pi(y) - log pi_ref(y), Schulman (2020), "Approximating KL
Divergence" (http://joschu.net/blog/kl-approx.html) gives three estimators of KL(pi || pi_ref):
    k1 = lr                      unbiased, high variance, can be negative per sample
    k2 = lr^2 / 2                biased (low for small KL), low variance, >= 0
    k3 = (e^{-lr} - 1) + lr      unbiased, low variance, >= 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    lr = logprobs - ref_logprobs
    return torch.expm1(-lr) + lr


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def categorical_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) between categorical distributions given by logits over the last dim: (..., V) -> (...)."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Adaptive beta of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", Sec. 2.2:
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
