"""Evaluate policies on held-out prompts: reward-model score, gold metrics, KL to the reference.

KL is computed exactly per position along sampled responses: for each sampled prefix, the full
categorical KL(pi(. | prefix) || pi_ref(. | prefix)) over the vocabulary. Its sum over positions is an
unbiased, low-variance estimate of the sequence-level KL(pi || pi_ref); its per-position mean shows
*where* the policy moved.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms.best_of_n import best_of_n_kl, best_of_n_texts
from rlhfkit.core.runio import read_json, tracked
from rlhfkit.data.batching import encode_prompts, pad_id, stop_ids
from rlhfkit.models.forward import freeze, response_logits
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.sampling import decode_responses, sample
from rlhfkit.ops.kl import categorical_kl
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.spine.reward_sources import build_scorer


@dataclass(frozen=True)
class BestOfN:
    """A policy that is a sampling rule: the best of n samples of the SFT policy by the reward model
    (OUT/best_of_n/sampler.json)."""

    n: int
    temperature: float


def policy_of(method, stage_dir: Path):
    """What evaluating `method` (an rlhfkit.algorithms.Method) samples from: its policy directory, or its sampler."""
    if method.output == "sampler":
        spec = read_json(Path(stage_dir) / "sampler.json")
        return BestOfN(spec["n"], spec["temperature"])
    return Path(stage_dir) / "model"


def heldout_prompts(task, n: int, seed: int) -> list[str]:
    """Evaluation prompts from their own random stream (never the training streams); a prompt file's
    held-out part (rlhfkit.tasks.files), each prompt once: when that part holds fewer than eval.n_prompts, the
    evaluation runs on all of them and says so (never repeating prompts to make up the number)."""
    prompts = task.heldout_prompts(n, random.Random(f"{seed}-eval"))
    if len(prompts) < n:
        print(f"[rlhfkit] note: eval.n_prompts = {n}, but the held-out part of the prompts holds {len(prompts)}; "
              f"evaluating on those {len(prompts)} (a larger data.heldout_fraction or more prompts gives more)",
              file=sys.stderr, flush=True)
    return prompts


@torch.no_grad()
def evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts: list[str], rt: Runtime,
                    seed: int, batch_size: int = 500, name: str = "policy") -> dict:
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    texts, kl_pos_sum, kl_pos_count, k1_total = [], None, None, 0.0
    for start in tracked(range(0, len(prompts), batch_size), f"eval: {name} on {len(prompts)} held-out prompts"):
        q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, prompts[start : start + batch_size]))
        with autocast(rt.device, rt.dtype):
            s = sample(policy, q, qm, max_new_tokens=task.max_new_tokens, eos_token_id=stop_ids(tokenizer),
                       pad_token_id=pad_id(tokenizer), generator=generator)
            logits = response_logits(policy, q, qm, s.responses, s.response_mask)  # (B, Tr, V)
            ref_logits = response_logits(ref_policy, q, qm, s.responses, s.response_mask)
        texts += decode_responses(tokenizer, s)
        kl = categorical_kl(logits, ref_logits) * s.response_mask  # (B, Tr)
        T = task.max_new_tokens
        kl = torch.nn.functional.pad(kl, (0, T - kl.shape[1]))
        m = torch.nn.functional.pad(s.response_mask, (0, T - s.response_mask.shape[1])).float()
        kl_pos_sum = kl.sum(0) if kl_pos_sum is None else kl_pos_sum + kl.sum(0)
        kl_pos_count = m.sum(0) if kl_pos_count is None else kl_pos_count + m.sum(0)
        lr = (gather_logprobs(logits, s.responses) - gather_logprobs(ref_logits, s.responses)) * s.response_mask
        k1_total += lr.sum().item()
    kl_per_position = (kl_pos_sum / kl_pos_count.clamp(min=1)).tolist()
    kl_total = (kl_pos_sum.sum() / len(prompts)).item()
    return {
        **({"reward": scorer(prompts, texts).mean().item()} if scorer is not None else {}),
        **task.gold_metrics(prompts, texts),
        "kl": kl_total,
        "kl_k1": k1_total / len(prompts),
        "kl_per_position": kl_per_position,
        "kl_first_position_share": (kl_pos_sum[0] / kl_pos_sum.sum().clamp(min=1e-12)).item(),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:8], texts[:8])],
        "completions": texts,  # every held-out completion; evaluate_run drops them unless asked
    }


def evaluate_best_of_n(policy, tokenizer, scorer, task, prompts: list[str], spec: BestOfN, rt: Runtime, seed: int) -> dict:
    """evaluate_policy's figures for best-of-n: the KL is the analytic bound log n - (n-1)/n (no per-position
    figures: the best-of-n distribution has no token log-probs to measure them with)."""
    if scorer is None:
        raise ValueError("best-of-n needs a reward model to pick with")
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    texts, scores = best_of_n_texts(policy, tokenizer, scorer, prompts, spec.n, max_new_tokens=task.max_new_tokens,
                                    temperature=spec.temperature, generator=generator, rt=rt)
    return {
        "reward": scores.mean().item(),
        **task.gold_metrics(prompts, texts),
        "kl": best_of_n_kl(spec.n),
        "kl_k1": math.nan,
        "kl_per_position": [math.nan] * task.max_new_tokens,
        "kl_first_position_share": math.nan,
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:8], texts[:8])],
        "completions": texts,
    }


@torch.no_grad()
def token_distributions(policy, tokenizer, prompt: str, n: int, max_new_tokens: int, rt: Runtime, seed: int):
    """(positions, vocab) marginal frequency of each token at each response position, from n samples."""
    q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, [prompt] * n))
    with autocast(rt.device, rt.dtype):
        s = sample(policy, q, qm, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer),
                   pad_token_id=pad_id(tokenizer), generator=torch.Generator(device=rt.device).manual_seed(seed))
    counts = torch.zeros(max_new_tokens, len(tokenizer))
    for t in range(s.responses.shape[1]):
        valid = s.response_mask[:, t].bool()
        counts[t] += torch.bincount(s.responses[valid, t].cpu(), minlength=len(tokenizer)).float()
    return (counts / n).tolist()


def evaluate_run(cfg, task, sft_dir: Path, rm_dir: Path | None, policies: dict, rt: Runtime,
                 keep_completions: bool = False) -> dict:
    """Evaluate each named policy (e.g. {'sft': path, 'ppo': path, 'best_of_n': BestOfN(8, 1.0)}) on the same
    held-out prompts; with a reward model (rm_dir) its mean score is reported too (a DPO run has none).
    keep_completions: also return every policy's completions ({"prompts": [...], "completions": {name: [...]}})."""
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    ref_policy = freeze(load_policy(sft_dir, rt.device, "reference policy"))
    scorer = build_scorer(cfg, task, rm_dir, rt) if rm_dir is not None else None  # the reward model(s), or reward.sources
    prompts = heldout_prompts(task, cfg.eval.n_prompts, cfg.seed)
    dist_prompt = cfg.eval.dist_prompt or prompts[0]
    results, dists = {}, {}
    for name, path in policies.items():
        if isinstance(path, BestOfN):  # sampled from the SFT policy, picked by the reward model
            results[name] = evaluate_best_of_n(ref_policy, tokenizer, scorer, task, prompts, path, rt, cfg.seed)
            continue
        # The SFT policy is the reference: reuse the loaded copy.
        policy = ref_policy if Path(path) == Path(sft_dir) else freeze(load_policy(path, rt.device, name))
        results[name] = evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts, rt, cfg.seed, name=name)
        dists[name] = token_distributions(policy, tokenizer, dist_prompt, cfg.eval.dist_samples, task.max_new_tokens, rt, cfg.seed)
    completions = {name: r.pop("completions") for name, r in results.items()}
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    result = {"policies": results, "distributions": {"prompt": dist_prompt, "vocab": vocab, "by_policy": dists}}
    if keep_completions:
        result["completions"] = {"prompts": prompts, "by_policy": completions}
    return result
