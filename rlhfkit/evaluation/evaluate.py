"""Evaluate policies on held-out prompts: reward-model score, gold metrics, KL to the reference.

KL is computed exactly per position along sampled responses: for each sampled prefix, the full
categorical KL(pi(. | prefix) || pi_ref(. | prefix)) over the vocabulary. Its sum over positions is an
unbiased, low-variance estimate of the sequence-level KL(pi || pi_ref); its per-position mean shows
*where* the policy moved.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from rlhfkit.data.batching import encode_prompts
from rlhfkit.models import autocast, freeze, load_policy, load_tokenizer
from rlhfkit.ops.kl import categorical_kl
from rlhfkit.ops.logprobs import gather_logprobs, response_logits
from rlhfkit.sampling import decode_responses, sample
from rlhfkit.training import Runtime


def heldout_prompts(task, n: int, seed: int) -> list[str]:
    """Evaluation prompts from their own random stream (never the training streams)."""
    return task.prompts(n, random.Random(f"{seed}-eval"))


@torch.no_grad()
def evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts: list[str], rt: Runtime,
                    seed: int, batch_size: int = 500) -> dict:
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    texts, kl_pos_sum, kl_pos_count, k1_total = [], None, None, 0.0
    for start in range(0, len(prompts), batch_size):
        q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, prompts[start : start + batch_size]))
        with autocast(rt.device, rt.dtype):
            s = sample(policy, q, qm, max_new_tokens=task.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generator=generator)
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
    }


@torch.no_grad()
def token_distributions(policy, tokenizer, prompt: str, n: int, max_new_tokens: int, rt: Runtime, seed: int):
    """(positions, vocab) marginal frequency of each token at each response position, from n samples."""
    q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, [prompt] * n))
    with autocast(rt.device, rt.dtype):
        s = sample(policy, q, qm, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, generator=torch.Generator(device=rt.device).manual_seed(seed))
    counts = torch.zeros(max_new_tokens, len(tokenizer))
    for t in range(s.responses.shape[1]):
        valid = s.response_mask[:, t].bool()
        counts[t] += torch.bincount(s.responses[valid, t].cpu(), minlength=len(tokenizer)).float()
    return (counts / n).tolist()


def evaluate_run(cfg, task, sft_dir: Path, rm_dir: Path | None, policies: dict[str, Path], rt: Runtime) -> dict:
    """Evaluate each named policy (e.g. {'sft': ..., 'ppo': ...}) on the same held-out prompts; with a
    reward model (rm_dir) its mean score is reported too (a DPO run has none)."""
    from rlhfkit.rewards import RewardModelScorer

    tokenizer = load_tokenizer(sft_dir, "sft policy")
    ref_policy = freeze(load_policy(sft_dir, rt.device, "reference policy"))
    scorer = RewardModelScorer(rm_dir, rt) if rm_dir is not None else None
    prompts = heldout_prompts(task, cfg.eval.n_prompts, cfg.seed)
    dist_prompt = cfg.eval.dist_prompt or prompts[0]
    results, dists = {}, {}
    for name, path in policies.items():
        # The SFT policy is the reference: reuse the loaded copy.
        policy = ref_policy if Path(path) == Path(sft_dir) else freeze(load_policy(path, rt.device, name))
        results[name] = evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts, rt, cfg.seed)
        dists[name] = token_distributions(policy, tokenizer, dist_prompt, cfg.eval.dist_samples, task.max_new_tokens, rt, cfg.seed)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {"policies": results, "distributions": {"prompt": dist_prompt, "vocab": vocab, "by_policy": dists}}
