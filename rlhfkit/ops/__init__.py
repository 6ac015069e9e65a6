"""The shared math: pure tensor functions used by every algorithm, each tested against an oracle.

    logprobs.py    gather per-token log-probs from logits (a model's forward passes: rlhfkit/models/forward.py)
    kl.py          per-token KL estimators k1/k2/k3, exact categorical KL, KL controllers
    advantages.py  KL-penalised per-token rewards, masked statistics, whitening, GAE, running reward moments,
                   RLOO and GRPO group baselines
    losses.py      every loss, one small function each: SFT, Bradley-Terry, PPO clipped policy and value,
                   RLOO's sequence-level and GRPO's per-token clipped losses; the
                   DPO family (DPO_LOSSES), listwise DPO and ranking losses (Plackett-Luce), in tables
    selection.py   which samples best-of-N, rejection sampling and ReST keep
    sampling.py    logit filters for sampling text: top-k, top-p (nucleus), min-p, repetition penalty

Layer: ops, the lowest above core. Pure tensor math, no model code: never imports models or transformers
(a contract in pyproject.toml). May import: core.
"""
