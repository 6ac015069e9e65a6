"""Every loss, as a small pure tensor function with its equation and source.

Each returns a scalar loss (mean over the batch / masked tokens) and, where useful, a dict of detached
statistics named in the metric vocabulary (docs/metrics.md).

Preference losses sit in tables, one signature per table (tests/test_preference_losses.py fails when an
entry has no value test or a different signature):

    DPO_LOSSES           (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta, label_smoothing=0.0) -> (loss, stats); inputs (B,) sequence log-probs
    LISTWISE_DPO_LOSSES  (policy_logps, ref_logps, ranks, beta) -> (loss, stats); inputs (N, K)
    RANKING_LOSSES       (scores, ranks) -> (loss, stats); reward-model scores (N, K)
    KTO_LOSSES           (policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, beta,
                          desirable_weight=1.0, undesirable_weight=1.0) -> (loss, stats); inputs (B,), labels
                          (B,) bool (True = thumbs up); the KL terms (M,) of mismatched pairs (section at the end)
    REFERENCE_FREE_LOSSES (policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
                          gamma=0.0) -> (loss, stats); inputs (B,): summed log-probs and completion lengths

Sequence log-probs are summed over completion tokens (prompt and padding excluded), as in the DPO paper and
TRL's DPOTrainer. DPO stats are batch means named as TRL's DPOTrainer logs them: `rewards/chosen`,
`rewards/rejected` (implicit rewards beta * (logps - ref_logps)), `rewards/margins`, `rewards/accuracies`
(share with r_chosen > r_rejected) and the raw policy `logps/chosen`, `logps/rejected`.

Rankings as tensors: `ranks` (N, K) integers, ranks[n, i] = position of completion i's tie group in ranking n,
0 = best, lower = better, equal values = tied; -1 marks padding (a ranking of fewer than K completions);
scores and log-probs under padding are ignored (they may be anything, NaN included) and get zero gradient.
`ranks_from_tie_groups` converts the data contract's tie-group lists (docs/data.md).

Tie rule (Plackett-Luce): a tie says nothing about the order inside the tie group, and each member is a Luce
(1959) choice from itself and every completion ranked strictly below it:
    log L = sum_i [ s_i - log( e^{s_i} + sum_{j : rank_j > rank_i} e^{s_j} ) ]
It is exactly Plackett-Luce (Plackett 1975) for a strict ranking, gives a tied pair no loss and no gradient
(as `ranking_to_pairs` gives it no comparison), and equals the exact likelihood that marginalises over the
tie's orders when the tie is at the bottom (top-k partial rankings). Elsewhere it is a lower bound on that
likelihood (its factors are P(U_i > max_{j below} U_j) under Gumbel utilities, positively associated), hence
an upper bound on the exact loss. Breslow's (1974) rule, the common alternative from Cox regression, puts
the tied peers in every member's denominator: a looser bound, and it penalises a score gap inside a tie
(a tied K = 2 pair would carry a loss that Bradley-Terry on the implied pairs does not).

Deviations from TRL 1.12.0 (tests/test_preference_losses.py compares with it):
- IPO takes the summed log-probs like the other DPO losses (Azar et al. define h on sequence probabilities);
  TRL divides each log-ratio by its completion length first. Pass per-token mean log-probs to get TRL's.
- cDPO is its own entry, "conservative"; TRL 1.12's "sigmoid" ignores label_smoothing and its "robust" is
  rDPO (Chowdhury et al. 2024), a different loss. Losses other than "conservative" reject label_smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.ops.advantages import masked_mean
from rlhfkit.ops.kl import KL_ESTIMATORS


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                       target: torch.Tensor | None = None):
    """Reward-model loss -log sigma(r(x, y_c) - r(x, y_r) - m) (Bradley & Terry 1952; InstructGPT eq. 1;
    margin m from Llama 2, Touvron et al. 2023, eq. 2). Inputs (B,); margin 0 where unknown.

    With `target` (B,), the probability t that chosen is better (an AI labeler's soft label; 1 = a hard label), the
    loss is the cross-entropy to it, -[t log sigma(d) + (1 - t) log sigma(-d)] with d the (margin-shifted)
    difference: distilled RLAIF (Lee et al. 2023, Sec. 2.2, "cross-entropy loss against the soft labels"). At t = 1
    it is the loss above; its minimum over d is at sigma(d) = t, not at d = infinity."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    if target is None:
        loss = -F.logsigmoid(diff).mean()
    else:
        loss = -(target * F.logsigmoid(diff) + (1.0 - target) * F.logsigmoid(-diff)).mean()
    return loss, {"accuracy": (chosen_scores > rejected_scores).float().mean().detach()}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token:
        L = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),  rho = exp(logprobs - old_logprobs)
    All (B, T); mean over masked tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    per_token, clip_active = clipped_surrogate(ratio, advantages, clip_range)
    loss = masked_mean(per_token, mask)
    stats = {
        "policy/clipfrac": masked_mean(clip_active.float(), mask).detach(),
        "policy/approxkl": _approxkl(log_ratio, mask),
        "policy/ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """PPO's clipped surrogate as a loss, elementwise (Schulman et al. 2017, eq. 7, negated):
        max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),
    and where the clipped branch is the larger (the clip is active). Shared by PPO (per token), RLOO (per
    sequence) and GRPO (per token)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _approxkl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(old || new) from tokens sampled under old: (rho - 1) - log rho (kl.py), a stable "how
    far did this epoch move" signal over response tokens (TRL logs k2 = lr^2 / 2, unmasked, instead)."""
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach()


def rloo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """RLOO's policy loss: REINFORCE on whole sequences (Ahmadian et al. 2024, "Back to Basics", eq. 6: the
    completion is one action), with the sequence ratio clipped as in PPO (TRL's RLOOTrainer):
        L = mean_i max(-A_i * rho_i, -A_i * clip(rho_i, 1 - eps, 1 + eps)),
        rho_i = exp(sum_t logprobs_it - sum_t old_logprobs_it)   (sums over response tokens)
    At rho = 1 (one update per batch) its gradient is REINFORCE's -mean_i A_i * grad log pi(y_i | x_i).
    logprobs, old_logprobs, mask (B, T); advantages (B,). Stats: policy/clipfrac is the share of sequences
    whose clip is active; policy/approxkl and policy/ratio are per token as PPO's (how far the update moved)."""
    mask = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1)  # (B,)
    ratio = torch.exp(seq_log_ratio)
    per_sequence, clip_active = clipped_surrogate(ratio, advantages, clip_range)  # (B,)
    token_log_ratio = logprobs - old_logprobs
    stats = {
        "policy/clipfrac": clip_active.float().mean().detach(),
        "policy/approxkl": _approxkl(token_log_ratio, mask),
        "policy/ratio": masked_mean(torch.exp(token_log_ratio), mask).detach(),
    }
    return per_sequence.mean(), stats


def grpo_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range: float, beta: float):
    """GRPO's objective as a loss (Shao et al. 2024, DeepSeekMath, eq. 3), KL in the loss:
        l_it = max(-A_i * rho_it, -A_i * clip(rho_it, 1 - eps, 1 + eps)) + beta * KL_it,
        rho_it = exp(logprobs_it - old_logprobs_it),   KL_it = k3 = pi_ref/pi - log(pi_ref/pi) - 1   (eq. 4)
        L = mean_i ( 1/|o_i| sum_t l_it )      per-sequence mean over its response tokens, then batch mean
    (the paper's 1/G sum_i 1/|o_i| sum_t; TRL's loss_type = "grpo"; DAPO's token-level mean is not this).
    The KL is evaluated at the current policy (with grad), on tokens sampled from the old one.
    logprobs, old_logprobs, ref_logprobs, mask (B, T); advantages (B,), one per sequence. Returns the loss and
    stats: loss/policy (the clipped term alone), loss/kl (the KL term before beta), clipfrac, approxkl, ratio."""
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).clamp(min=1)  # (B,)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surrogate, clip_active = clipped_surrogate(ratio, advantages[:, None], clip_range)  # (B, T)
    kl = KL_ESTIMATORS["k3"](logprobs, ref_logprobs)  # (B, T)
    policy_term = ((surrogate * mask).sum(-1) / lengths).mean()
    kl_term = ((kl * mask).sum(-1) / lengths).mean()
    stats = {
        "loss/policy": policy_term.detach(),
        "loss/kl": kl_term.detach(),
        "policy/clipfrac": masked_mean(clip_active.float(), mask).detach(),
        "policy/approxkl": _approxkl(log_ratio, mask),
        "policy/ratio": masked_mean(ratio, mask).detach(),
    }
    return policy_term + beta * kl_term, stats


def ppo_value_loss(values, old_values, returns, mask, clip_range_value: float):
    """Clipped value loss (lm-human-preferences; Schulman et al. 2017's PPO baselines):
        L = 1/2 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2). All (B, T); mean over masked tokens.

    clamp(V, lo, hi) returns V itself inside the range, so the two branches tie exactly there and
    value/clipfrac counts only tokens where clipping is active (V_old + clamp(V - V_old, -eps, eps) rounds,
    which counted ~0.1% of in-range tokens as clipped). TRL's PPO trainer clamps the same way."""
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value/clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per completion token (prompt tokens carry no loss). (B, T) -> scalar."""
    return -masked_mean(logprobs, completion_mask)


# ---------------------------------------------------------------- DPO family: pairs of sequence log-probs

def _dpo_stats(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Batch means of the implicit rewards r = beta * (logps - ref_logps) (Rafailov et al. 2023, Sec. 4) and
    of the raw policy log-probs (TRL's DPOTrainer metric names)."""
    return _pair_stats(beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps),
                       policy_chosen_logps, policy_rejected_logps)


def _pair_stats(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """The DPO family's metrics from (B,) implicit rewards of chosen and rejected and the policy's log-probs."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = log pi(y_c)/pi_ref(y_c) - log pi(y_r)/pi_ref(y_r), (B,): the log-ratio difference every DPO loss uses."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _reject_label_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing={label_smoothing} has no effect on the {name!r} DPO loss: use the "
                         "'conservative' loss (cDPO) for noisy labels, or set label_smoothing to 0")


def dpo_sigmoid_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                     label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7):  L = -log sigma(beta * h), mean over pairs; ln 2 at policy = reference."""
    _reject_label_smoothing("sigmoid", label_smoothing)
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(beta * h).mean()
    return loss, _dpo_stats(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def dpo_conservative_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta: float, label_smoothing: float = 0.0):
    """Conservative DPO, cDPO (Mitchell 2023, "A note on DPO with noisy preferences", eq. 3), labels flipped
    with probability eps = label_smoothing:  L = (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h).
    eps = 0 is DPO; eps must lie in [0, 0.5) (at 0.5 the labels carry no information)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: cDPO needs a label-flip probability in [0, 0.5)")
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), _dpo_stats(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def dpo_ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                 label_smoothing: float = 0.0):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17, tau = beta):  L = (h - 1 / (2 beta))^2, a regression of h onto a finite target margin.

    h from summed log-probs (module docstring: TRL averages per token; pass mean log-probs to match it)."""
    _reject_label_smoothing("ipo", label_smoothing)
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    return loss, _dpo_stats(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def dpo_hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                   label_smoothing: float = 0.0):
    """Hinge (SLiC-HF, Zhao et al. 2023, calibration loss max(0, delta - log pi(y_c) + log pi(y_r)), on the
    reference-normalised log-ratios as RSO's hinge-norm, Liu et al. 2023, and TRL's "hinge"):
        L = max(0, 1 - beta * h),  i.e. beta * max(0, 1/beta - h): margin delta = 1 / beta."""
    _reject_label_smoothing("hinge", label_smoothing)
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    loss = torch.relu(1 - beta * h).mean()
    return loss, _dpo_stats(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


DPO_LOSSES = {
    "sigmoid": dpo_sigmoid_loss,
    "conservative": dpo_conservative_loss,
    "ipo": dpo_ipo_loss,
    "hinge": dpo_hinge_loss,
}


# ---------------------------------------------------------------- reference-free: the policy's own log-probs

def _length_normalised(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) mean log-prob per completion token: summed log-probs / completion length (EOS counted)."""
    return logps / lengths.to(logps.dtype).clamp(min=1)


def _reference_free_stats(policy_chosen_logps, policy_rejected_logps, chosen_mean, rejected_mean, beta):
    """_dpo_stats' names for a loss without a reference: the implicit reward is beta * the mean log-prob per token
    (SimPO's r(x, y), Meng et al. 2024, eq. 4; TRL's CPO/ORPO trainers log the same); logps/* stay the summed
    log-probs, as every other method logs them."""
    return _pair_stats(beta * chosen_mean, beta * rejected_mean, policy_chosen_logps, policy_rejected_logps)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta: float,
               gamma: float = 0.0):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6):
        L = -log sigma( beta/|y_c| log pi(y_c|x) - beta/|y_r| log pi(y_r|x) - gamma ),
    the length-normalised log-prob as the implicit reward (no reference model) and a target margin gamma >= 0.
    Inputs (B,): summed completion log-probs and completion lengths in tokens. TRL's CPOTrainer with
    loss_type = "simpo" computes the same (its simpo_gamma is gamma)."""
    chosen = _length_normalised(policy_chosen_logps, chosen_lengths)  # (B,)
    rejected = _length_normalised(policy_rejected_logps, rejected_lengths)
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma).mean()
    return loss, _reference_free_stats(policy_chosen_logps, policy_rejected_logps, chosen, rejected, beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))":
    log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta: float,
              gamma: float = 0.0):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 2-7),
    beta = the paper's lambda (TRL's ORPOConfig.beta):
        L = L_SFT + beta * L_OR,   L_SFT = -1/|y_c| log pi(y_c|x)  (the chosen reply's NLL per token),
        L_OR = -log sigma( log odds(y_c) - log odds(y_r) ),   odds(y) = P(y|x) / (1 - P(y|x)),
        P(y|x) = exp(1/|y| log pi(y|x))   (the per-token geometric mean, eq. 4), each term a batch mean.
    log odds = m - log(1 - e^m) for the mean log-prob m < 0. Inputs as simpo_loss; gamma is not a parameter of
    ORPO (must be 0). Stats: _reference_free_stats, and loss/nll, loss/odds_ratio (L_OR before beta) and
    log_odds_ratio (the batch mean of log odds(y_c) - log odds(y_r))."""
    if gamma != 0.0:
        raise ValueError(f"gamma={gamma}: ORPO has no target margin (that is SimPO's); set it to 0")
    chosen = _length_normalised(policy_chosen_logps, chosen_lengths)  # (B,) mean log-probs, < 0
    rejected = _length_normalised(policy_rejected_logps, rejected_lengths)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))  # (B,)
    nll = -chosen.mean()
    odds_ratio = -F.logsigmoid(log_odds).mean()
    stats = _reference_free_stats(policy_chosen_logps, policy_rejected_logps, chosen, rejected, beta)
    stats.update({"loss/nll": nll.detach(), "loss/odds_ratio": odds_ratio.detach(),
                  "log_odds_ratio": log_odds.detach().mean()})
    return nll + beta * odds_ratio, stats


REFERENCE_FREE_LOSSES = {
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


# ---------------------------------------------------------------- K-way rankings (ties and padding: see top)

def ranks_from_tie_groups(rankings: list[list[list[int]]], k: int | None = None) -> torch.Tensor:
    """(N, K) ranks from the data contract's rankings (tie groups of completion indices, best first):
    ranks[n, i] = index of the group holding completion i; -1 where ranking n has fewer than K completions.
    K defaults to the longest ranking. [[1], [0, 3], [2]] -> [1, 0, 2, 1]."""
    k = max(sum(len(g) for g in r) for r in rankings) if k is None else k
    ranks = torch.full((len(rankings), k), -1, dtype=torch.long)
    for n, ranking in enumerate(rankings):
        for position, group in enumerate(ranking):
            ranks[n, group] = position
    return ranks


def _ranked_above(ranks: torch.Tensor) -> torch.Tensor:
    """(N, K, K) bool: [n, i, j] = completion i is ranked strictly above completion j, both present."""
    present = ranks >= 0  # (N, K)
    return (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]


def _check_rankings(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return the scores with padding replaced by 0 (so NaN there cannot reach a gradient)."""
    if scores.dim() != 2 or scores.shape != ranks.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} must both be (N, K)")
    if ranks.is_floating_point():
        raise ValueError("ranks must be an integer tensor (0 = best, equal = tied, -1 = padding)")
    return scores.masked_fill(ranks < 0, 0.0)


def _pair_accuracy(scores: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """Share of the batch's implied pairs (i above j) with s_i > s_j, detached; ties imply no pair."""
    correct = above & (scores[:, :, None] > scores[:, None, :])
    return (correct.sum().to(scores.dtype) / above.sum().clamp(min=1)).detach()


def plackett_luce_loss(scores: torch.Tensor, ranks: torch.Tensor):
    """Plackett-Luce negative log-likelihood of each K-way ranking (Plackett 1975; Luce 1959), summed over
    the ranking's choices, mean over rankings; for a strict ranking tau:
        L = -sum_k [ s_tau(k) - log sum_{j >= k} e^{s_tau(j)} ]
    Ties by the rule at the top of this module (each member chosen over itself and everything below). K = 2
    is Bradley-Terry. scores, ranks (N, K); stats: accuracy over the implied pairs."""
    scores = _check_rankings(scores, ranks)  # (N, K)
    present = ranks >= 0
    above = _ranked_above(ranks)  # (N, K, K)
    eye = torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)
    choice_set = above | eye  # (N, K, K): completion i is chosen from {i} and every j ranked below i
    log_denominator = torch.logsumexp(scores[:, None, :].masked_fill(~choice_set, float("-inf")), dim=-1)  # (N, K)
    log_likelihood = torch.where(present, scores - log_denominator, 0.0).sum(dim=1)  # (N,)
    return -log_likelihood.mean(), {"accuracy": _pair_accuracy(scores, above)}


def ranked_pairs_bradley_terry_loss(scores: torch.Tensor, ranks: torch.Tensor):
    """Bradley-Terry on every pair a ranking implies (InstructGPT, Ouyang et al. 2022, eq. 1: all C(K, 2)
    comparisons of a K-way ranking in one batch element, weighted 1 / C(K, 2)):
        L = -1/|P| sum_{(i, j) in P} log sigma(s_i - s_j),  P = pairs with i ranked strictly above j,
    mean over rankings; ties give no pair (`ranking_to_pairs`), a ranking without pairs contributes 0. K = 2 is
    `bradley_terry_loss`. The baseline for Plackett-Luce on the same labels. scores, ranks (N, K)."""
    scores = _check_rankings(scores, ranks)  # (N, K)
    above = _ranked_above(ranks)  # (N, K, K)
    nll = -F.logsigmoid(scores[:, :, None] - scores[:, None, :])  # (N, K, K): -log sigma(s_i - s_j)
    per_ranking = torch.where(above, nll, 0.0).sum(dim=(1, 2)) / above.sum(dim=(1, 2)).clamp(min=1)  # (N,)
    return per_ranking.mean(), {"accuracy": _pair_accuracy(scores, above)}


RANKING_LOSSES = {
    "plackett_luce": plackett_luce_loss,
    "bradley_terry": ranked_pairs_bradley_terry_loss,
}


def _listwise_dpo_stats(policy_logps, rewards, ranks):
    """DPO's metrics over K-way rankings: "chosen" = the best tie group, "rejected" = the worst, each averaged
    within its group, then over rankings; accuracies over all implied pairs. Equal to _dpo_stats at K = 2."""
    present = ranks >= 0  # (N, K)
    best = torch.where(present, ranks, ranks.max() + 1).min(dim=1, keepdim=True).values
    top = present & (ranks == best)  # (N, K)
    bottom = present & (ranks == ranks.max(dim=1, keepdim=True).values)

    def group_mean(x, group):  # (N, K), (N, K) bool -> (N,)
        return torch.where(group, x.detach(), 0.0).sum(dim=1) / group.sum(dim=1).clamp(min=1)

    chosen, rejected = group_mean(rewards, top), group_mean(rewards, bottom)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": _pair_accuracy(torch.where(present, rewards.detach(), 0.0), _ranked_above(ranks)),
        "logps/chosen": group_mean(policy_logps, top).mean(),
        "logps/rejected": group_mean(policy_logps, bottom).mean(),
    }


def dpo_plackett_luce_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, beta: float):
    """DPO over K-way rankings (Rafailov et al. 2023, App. A.3, the Plackett-Luce form of DPO; LiPO's DPO-PL,
    Liu et al. 2024): Plackett-Luce over the implicit rewards r_i = beta * (logp_i - ref_logp_i),
        L = -sum_k [ r_tau(k) - log sum_{j >= k} e^{r_tau(j)} ],
    with `plackett_luce_loss`'s tie rule and padding. K = 2 is `dpo_sigmoid_loss`. Inputs (N, K) sequence
    log-probs summed over completion tokens and the ranks."""
    rewards = beta * (policy_logps - ref_logps)  # (N, K)
    loss, _ = plackett_luce_loss(rewards, ranks)
    return loss, _listwise_dpo_stats(policy_logps, rewards, ranks)


LISTWISE_DPO_LOSSES = {"plackett_luce": dpo_plackett_luce_loss}


# ---------------------------------------------------------------- KTO: unpaired binary feedback (thumbs up/down)

def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 8 and Sec. 4.1): an estimate of KL(pi || pi_ref) from
    the batch, mean over mismatched pairs (x_i, y_j), j != i, of log pi(y_j|x_i) - log pi_ref(y_j|x_i); clamped at 0
    (a KL is not negative; the one-sample estimate can be) and detached: the paper does not back-propagate through
    z0 ("for the sake of stability"). Inputs (M,) sequence log-probs; returns a scalar."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8):
        r = log pi(y|x) / pi_ref(y|x),   z0 = kto_reference_point(...)
        v = lambda_D * sigma(beta * (r - z0))   if y is desirable (thumbs up)
            lambda_U * sigma(beta * (z0 - r))   if y is undesirable (thumbs down)
        L = mean over the batch of (lambda_y - v),  i.e. lambda_y * (1 - sigma(+-beta * (r - z0)))
    (TRL's KTOTrainer, loss_type = "kto", computes the same). At policy = reference (r = 0, z0 = 0) every term is
    lambda_y / 2. policy_logps, ref_logps (B,) summed over completion tokens; labels (B,) bool; policy_kl_logps,
    ref_kl_logps (M,) of the mismatched pairs. Stats (detached): `rewards/chosen` and `rewards/rejected`, the mean
    implicit reward beta * r of the desirable and the undesirable completions (each present only when the batch
    has one; TRL's names), `rewards/margins` (their difference, when both), `logps/chosen`, `logps/rejected`
    likewise, and `kto/kl`, z0 (TRL logs it as `kl`)."""
    labels = labels.to(torch.bool)
    z0 = kto_reference_point(policy_kl_logps, ref_kl_logps)
    logratios = policy_logps - ref_logps  # (B,)
    sign = torch.where(labels, 1.0, -1.0).to(logratios.dtype)  # up: sigma(beta (r - z0)); down: sigma(beta (z0 - r))
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(logratios.dtype)  # (B,)
    losses = weights * (1.0 - torch.sigmoid(beta * sign * (logratios - z0)))  # (B,)
    rewards = beta * logratios.detach()
    stats = {"kto/kl": z0}
    for name, group in (("chosen", labels), ("rejected", ~labels)):
        if group.any():
            stats[f"rewards/{name}"] = rewards[group].mean()
            stats[f"logps/{name}"] = policy_logps.detach()[group].mean()
    if "rewards/chosen" in stats and "rewards/rejected" in stats:
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.mean(), stats


KTO_LOSSES = {"kto": kto_loss}
