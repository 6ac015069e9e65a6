"""Rollout collection, shared by every method that samples from its policy (PPO, RLOO, GRPO, best-of-N, rejection
sampling, ReST): sample -> score -> log-probs of policy and reference -> values when there is a critic.

    rollouts = collect_rollouts(policy, reference, scorer, tokenizer, prompts, k=..., ...)

A method owns what happens next (PPO shapes per-token rewards and runs GAE; RLOO/GRPO compare the K
completions of a prompt). The reference is rlhfkit.models.reference.Reference: a frozen copy of the SFT model,
or the adapter-disabled LoRA policy (the same weights, no second copy in memory).

Layer: spine (imports models, data, ops, core).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit.data.batching import encode_prompts, pad_id, stop_ids
from rlhfkit.models.forward import forward_response
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.optim import has_checkpoint
from rlhfkit.models.reference import Reference, policy_and_reference
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.sampling import SamplingParams, decode_responses, sample
from rlhfkit.spine.reward_sources import build_scorer


@dataclass
class Rollouts:
    """One batch of sampled responses with everything an online method needs. B = prompts x k rows; the
    K completions of one prompt are consecutive rows (TRL's layout), `group` says which prompt."""

    prompts: list[str]  # (B,) the prompt of each row
    group: torch.Tensor  # (B,) index of the row's prompt in the prompts passed in
    queries: torch.Tensor  # (B, Tq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Tq)
    responses: torch.Tensor  # (B, Tr) sampled ids, pad after EOS
    response_mask: torch.Tensor  # (B, Tr) 1 up to and including EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    texts: list[str]  # (B,) decoded responses, what the scorer and the gold labeler judged
    scores: torch.Tensor  # (B,) raw reward (scorer output), no penalty or normalisation
    logprobs: torch.Tensor | None  # (B, Tr) policy log-probs, 0 outside the mask (None: with_logprobs=False)
    ref_logprobs: torch.Tensor | None  # (B, Tr) reference log-probs, 0 outside the mask (likewise)
    values: torch.Tensor | None  # (B, Tr) critic values before each token (None without a critic)
    entropy: torch.Tensor | None  # (B, Tr) policy entropy at each response position (likewise)
    source_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,): each reward source's score


@torch.no_grad()
def collect_rollouts(policy, reference, scorer, tokenizer, prompts: list[str], *, max_new_tokens: int,
                     temperature: float, generator: torch.Generator, rt: Runtime, k: int = 1,
                     value_model=None, with_logprobs: bool = True, policy_logprobs: bool = True,
                     sampling: SamplingParams | None = None) -> Rollouts:
    """Sample k responses per prompt with the shared KV-cache sampler, score the decoded text, and compute
    log-probs under the policy and the reference (and values, with a critic), once and without grad.
    Methods that only select among samples (best-of-N, rejection sampling) pass with_logprobs=False and
    reference=None: no forward beyond sampling and scoring. policy_logprobs=False skips the policy's pass (logprobs
    and entropy None): for a method whose one update starts from the sampling policy, which takes them from its own
    training pass (GRPO, rlhfkit/algorithms/grpo.py). `sampling`: the [sampling] filters and stop strings
    the tokens are drawn with; the log-probs are the model's at `temperature` without them (as TRL's)."""
    rows = [p for p in prompts for _ in range(k)]
    group = torch.arange(len(prompts), device=rt.device).repeat_interleave(k)
    queries, query_mask = (t.to(rt.device) for t in encode_prompts(tokenizer, rows))

    # a. Sample (eval mode: no dropout while the tokens are picked or scored).
    was_training = policy.training
    policy.eval()
    with autocast(rt.device, rt.dtype):
        s = sample(policy, queries, query_mask, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer),
                   pad_token_id=pad_id(tokenizer), temperature=temperature, generator=generator, sampling=sampling,
                   tokenizer=tokenizer)
    mask = s.response_mask

    # b. Score the decoded text (every token before EOS, special tokens included) with the scorer's tokenizer;
    #    a combination of reward sources (rlhfkit.spine.reward_sources) also gives each source's score.
    texts = decode_responses(tokenizer, s)
    if hasattr(scorer, "score_sources"):
        scores, source_scores = scorer.score_sources(rows, texts)  # (B,), {name: (B,)}
    else:
        scores, source_scores = scorer(rows, texts), {}

    if not with_logprobs:
        policy.train(was_training)
        return Rollouts(rows, group, queries, query_mask, s.responses, mask, s.ended, texts, scores,
                        None, None, None, None, source_scores)

    # c. Log-probs of policy and reference, values, entropy: at the sampling temperature, without the [sampling]
    #    filters (TRL's choice too; rlhfkit/models/sampling.py says what that means).
    logprobs = values = entropy = None
    if policy_logprobs or value_model is not None:
        logprobs, values, entropy = forward_response(policy, value_model, queries, query_mask, s.responses, mask,
                                                     temperature, rt, with_entropy=True)
        logprobs = logprobs * mask
    ref_logprobs = reference.logprobs(queries, query_mask, s.responses, mask, temperature, rt)
    policy.train(was_training)
    return Rollouts(rows, group, queries, query_mask, s.responses, mask, s.ended, texts, scores,
                    logprobs, ref_logprobs * mask, values, entropy, source_scores)


@dataclass
class OnlineModels:
    """The models an online method starts from (PPO adds its value model)."""

    tokenizer: object  # the SFT policy's tokenizer
    policy: object  # trained: the SFT policy, or the checkpoint's when resuming
    reference: Reference  # the SFT policy: a frozen copy, or the LoRA policy with its adapter off
    scorer: object  # the reward (rlhfkit.spine.reward_sources.build_scorer), frozen, reading decoded text
    resume: bool  # ckpt_dir holds a complete checkpoint to resume from


def load_online_models(cfg, task, sft_dir, rm_dir, ckpt_dir, rt: Runtime) -> OnlineModels:
    """Tokenizer, policy (from ckpt_dir/policy when resuming), reference and scorer: the run's reward model
    (rm_dir), or the combination of reward.sources. The reference is a frozen copy of the SFT policy, or with
    LoRA (lora.r > 0, rlhfkit.models.lora) the policy itself with its adapter disabled: one set of weights in memory."""
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    resume = has_checkpoint(ckpt_dir)
    policy, reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed,
                                             resume_from=ckpt_dir / "policy" if resume else None)
    return OnlineModels(tokenizer, policy, reference, build_scorer(cfg, task, rm_dir, rt), resume)


def rollout_metrics(r: Rollouts, task) -> dict:
    """What every online method logs about its rollout batch, under one set of names (docs/metrics.md):
    entropy (per response, summed over tokens, TRL's definition), the share without EOS, the mean length,
    each reward source's mean score (objective/scores/<name>, with reward.sources), and the task's true
    objective on the same rollouts (gold/*: proxy vs gold, for reward hacking)."""
    mask = r.response_mask
    return {
        "objective/entropy": (r.entropy * mask).sum(1).mean().item(),
        "objective/no_eos_rate": (~r.ended).float().mean().item(),
        "objective/response_length": mask.sum(1).float().mean().item(),
        **{f"objective/scores/{name}": s.mean().item() for name, s in r.source_scores.items()},
        **{f"gold/{k}": v for k, v in task.gold_metrics(r.prompts, r.texts).items()},
    }
