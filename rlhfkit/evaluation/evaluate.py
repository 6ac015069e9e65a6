"""Evaluate policies on held-out prompts: reward-model score, gold metrics, KL to the reference, and what the
replies look like (length, diversity, repetition), for any task.

KL is computed exactly per position along sampled responses: for each sampled prefix, the full
categorical KL(pi(. | prefix) || pi_ref(. | prefix)) over the vocabulary. Its sum over positions is an
unbiased, low-variance estimate of the sequence-level KL(pi || pi_ref); its per-position mean shows
*where* the policy moved.

The reply metrics (reply_metrics) are on whitespace-split words, so they mean the same for every tokenizer:
distinct-n as Li et al. 2016 ("A Diversity-Promoting Objective Function for Neural Conversation Models", Sec. 4.3:
distinct n-grams over all generated replies / their total count), and a repetition rate (rlhfkit's own rule: the
share of replies in which some word bigram occurs twice), the loop a policy optimised too far falls into.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms.best_of_n import best_of_n_kl, best_of_n_texts
from rlhfkit.core.runio import read_json, tracked
from rlhfkit.data.batching import encode_prompts, pad_id, stop_ids
from rlhfkit.data.labelled import TOXICITY_LABELS
from rlhfkit.models.forward import freeze, response_logits
from rlhfkit.models.judge import judge_pairs
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.scoring import ClassLabelScorer
from rlhfkit.models.sampling import SamplingParams, decode_responses, sample
from rlhfkit.ops.kl import categorical_kl
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.spine.reward_sources import build_scorer

# The per-position token distributions of one prompt are stored whole (positions x vocabulary) only for a small
# vocabulary, as digits' 15 tokens: for a real model's 50k tokens over 40+ positions that table is millions of
# numbers in eval.json and its plot tens of thousands of bars. Above DENSE_VOCAB_MAX tokens the evaluation keeps
# the first TOP_POSITIONS positions and, at each, the TOP_K most frequent tokens of each policy (distributions_record).
DENSE_VOCAB_MAX, TOP_POSITIONS, TOP_K = 64, 8, 10


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


def reply_metrics(texts: list[str], n_tokens: list[int]) -> dict[str, float]:
    """What the replies look like, whatever the task (the module docstring has the sources): `length` (mean
    tokens per reply, from n_tokens: the stop token not counted), `length_words`, `distinct_1` and `distinct_2`
    (distinct word unigrams / bigrams over all replies divided by their total count; bigrams never span two
    replies; 0 when there are none) and `repetition_rate` (share of replies in which some word bigram occurs more
    than once). Words are whitespace-split, case and punctuation kept."""
    words = [t.split() for t in texts]
    bigrams = [list(itertools.pairwise(w)) for w in words]
    unigrams_all, bigrams_all = [u for w in words for u in w], [b for bs in bigrams for b in bs]
    n = max(1, len(texts))
    return {
        "length": sum(n_tokens) / n,
        "length_words": len(unigrams_all) / n,
        "distinct_1": len(set(unigrams_all)) / len(unigrams_all) if unigrams_all else 0.0,
        "distinct_2": len(set(bigrams_all)) / len(bigrams_all) if bigrams_all else 0.0,
        "repetition_rate": sum(len(set(bs)) < len(bs) for bs in bigrams) / n,
    }


def source_means(scorer, prompts: list, texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """The scorer's (B,) scores and, when it combines reward sources (reward.sources: a CombinedScorer), each
    source's mean score as {"reward/<name>": mean} (else {})."""
    if hasattr(scorer, "score_sources"):
        combined, by_source = scorer.score_sources(prompts, texts)
        return combined, {f"reward/{name}": s.float().mean().item() for name, s in by_source.items()}
    return scorer(prompts, texts), {}


@torch.no_grad()
def evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts: list[str], rt: Runtime,
                    seed: int, batch_size: int = 500, name: str = "policy",
                    sampling: SamplingParams | None = None) -> dict:
    """The figures of one policy on `prompts` (the module docstring), its replies sampled at temperature 1 with the
    [sampling] filters and stop strings `sampling`; the KL is the model's own (unfiltered) distribution's."""
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    texts, n_tokens, kl_pos_sum, kl_pos_count, k1_total = [], [], None, None, 0.0
    for start in tracked(range(0, len(prompts), batch_size), f"eval: {name} on {len(prompts)} held-out prompts"):
        q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, prompts[start : start + batch_size]))
        with autocast(rt.device, rt.dtype):
            s = sample(policy, q, qm, max_new_tokens=task.max_new_tokens, eos_token_id=stop_ids(tokenizer),
                       pad_token_id=pad_id(tokenizer), generator=generator, sampling=sampling, tokenizer=tokenizer)
            logits = response_logits(policy, q, qm, s.responses, s.response_mask)  # (B, Tr, V)
            ref_logits = response_logits(ref_policy, q, qm, s.responses, s.response_mask)
        texts += decode_responses(tokenizer, s)
        eos = s.ended & ~s.by_stop_string  # a reply cut at a stop string keeps the tokens that completed it
        n_tokens += (s.response_mask.sum(1) - eos.long()).tolist()  # the reply's tokens, as decoded: no stop token
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
    scores, sources = source_means(scorer, prompts, texts) if scorer is not None else (None, {})
    return {
        **({"reward": scores.mean().item()} if scorer is not None else {}),
        **task.gold_metrics(prompts, texts),
        "kl": kl_total,
        "kl_k1": k1_total / len(prompts),
        "kl_per_position": kl_per_position,
        "kl_first_position_share": (kl_pos_sum[0] / kl_pos_sum.sum().clamp(min=1e-12)).item(),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:8], texts[:8])],
        **sources,  # new keys after the ones above, whose names and values stay as they were
        **reply_metrics(texts, n_tokens),
        "completions": texts,  # every held-out completion; evaluate_run drops them unless asked
    }


def evaluate_best_of_n(policy, tokenizer, scorer, task, prompts: list[str], spec: BestOfN, rt: Runtime, seed: int,
                       sampling: SamplingParams | None = None) -> dict:
    """evaluate_policy's figures for best-of-n: the KL is the analytic bound log n - (n-1)/n (no per-position
    figures: the best-of-n distribution has no token log-probs to measure them with). Its sampler returns texts,
    so `length` counts the tokens of each picked reply re-tokenised; `reward/<name>` scores the picks once more
    with each source."""
    if scorer is None:
        raise ValueError("best-of-n needs a reward model to pick with")
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    texts, scores = best_of_n_texts(policy, tokenizer, scorer, prompts, spec.n, max_new_tokens=task.max_new_tokens,
                                    temperature=spec.temperature, generator=generator, rt=rt, sampling=sampling)
    sources = source_means(scorer, prompts, texts)[1] if hasattr(scorer, "score_sources") else {}
    n_tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return {
        "reward": scores.mean().item(),
        **task.gold_metrics(prompts, texts),
        "kl": best_of_n_kl(spec.n),
        "kl_k1": math.nan,
        "kl_per_position": [math.nan] * task.max_new_tokens,
        "kl_first_position_share": math.nan,
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:8], texts[:8])],
        **sources,
        **reply_metrics(texts, n_tokens),
        "completions": texts,
    }


def distribution_positions(vocab_size: int, max_new_tokens: int) -> int:
    """How many reply positions the token distributions cover: all for a small vocabulary, else the first
    TOP_POSITIONS."""
    return max_new_tokens if vocab_size <= DENSE_VOCAB_MAX else min(TOP_POSITIONS, max_new_tokens)


@torch.no_grad()
def token_distributions(policy, tokenizer, prompt, n: int, max_new_tokens: int, rt: Runtime, seed: int,
                        sampling: SamplingParams | None = None) -> torch.Tensor:
    """(positions, vocab) marginal frequency of each token at each response position, from n samples (drawn as
    the evaluation draws replies: with the [sampling] filters); positions as distribution_positions (the sampler
    stops there: later tokens would not change the earlier ones)."""
    n_pos = distribution_positions(len(tokenizer), max_new_tokens)
    q, qm = (t.to(rt.device) for t in encode_prompts(tokenizer, [prompt] * n))
    with autocast(rt.device, rt.dtype):
        s = sample(policy, q, qm, max_new_tokens=n_pos, eos_token_id=stop_ids(tokenizer),
                   pad_token_id=pad_id(tokenizer), generator=torch.Generator(device=rt.device).manual_seed(seed),
                   sampling=sampling, tokenizer=tokenizer)
    counts = torch.zeros(n_pos, len(tokenizer))
    for t in range(s.responses.shape[1]):
        valid = s.response_mask[:, t].bool()
        counts[t] += torch.bincount(s.responses[valid, t].cpu(), minlength=len(tokenizer)).float()
    return counts / n


def distributions_record(prompt, freqs: dict[str, torch.Tensor], tokenizer) -> dict:
    """What eval.json keeps of each policy's (positions, vocab) frequencies (token_distributions). A vocabulary
    of at most DENSE_VOCAB_MAX tokens: every frequency, {"prompt", "vocab", "by_policy": {name: (positions, vocab)
    lists}}. A larger one: at each position the union of each policy's TOP_K most frequent tokens (those sampled at
    all), most frequent first, {"prompt", "vocab_size", "top_k", "token_ids" and "tokens" (decoded text): one list
    per position, "by_policy": {name: each position's frequencies of those tokens}}."""
    if len(tokenizer) <= DENSE_VOCAB_MAX:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return {"prompt": prompt, "vocab": vocab, "by_policy": {name: f.tolist() for name, f in freqs.items()}}
    names, n_pos = list(freqs), next(iter(freqs.values())).shape[0]
    token_ids, by_policy = [], {name: [] for name in names}
    for p in range(n_pos):
        stacked = torch.stack([freqs[name][p] for name in names])  # (policies, vocab)
        top = stacked.topk(min(TOP_K, stacked.shape[1]), dim=1)
        ids = {i for vals, idx in zip(top.values.tolist(), top.indices.tolist()) for v, i in zip(vals, idx) if v > 0}
        ids = sorted(ids, key=lambda i: (-stacked[:, i].max().item(), i))
        token_ids.append(ids)
        for j, name in enumerate(names):
            by_policy[name].append([stacked[j, i].item() for i in ids])
    return {"prompt": prompt, "vocab_size": len(tokenizer), "top_k": TOP_K, "token_ids": token_ids,
            "tokens": [[tokenizer.decode([i]) for i in ids] for ids in token_ids], "by_policy": by_policy}


def toxicity_classifier(path: Path, rt: Runtime) -> ClassLabelScorer:
    """The run's toxicity classifier (OUT/toxicity/model) as P(toxic) of each reply (it reads the reply alone)."""
    return ClassLabelScorer(path, rt, TOXICITY_LABELS[1], output="prob")


def toxicity_score(classifier, prompts: list, texts: list) -> float:
    """The replies' mean P(toxic) under a toxicity classifier (a ClassLabelScorer of class 'toxic', output 'prob';
    rlhfkit's own reads each reply alone): a policy's `toxicity_score`, in [0, 1], lower is better."""
    return classifier(prompts, texts).float().mean().item() if texts else math.nan


def beside_gold(figures: dict, key: str, value, gold: tuple[str, ...]) -> dict:
    """`figures` with key: value right after the task's gold metrics (else after `reward`, else first), so that
    eval.json and the report's table show it among them."""
    items = list(figures.items())
    names = [k for k, _ in items]
    anchors = [names.index(k) for k in gold if k in figures]
    if not anchors and "reward" in figures:
        anchors = [names.index("reward")]
    at = max(anchors, default=-1) + 1
    return dict([*items[:at], (key, value), *items[at:]])


def win_outcome(p: float) -> float:
    """A match's outcome from the judge's P(a better): 1 (a wins), 0 (b wins) or 1/2 (a tie)."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def judge_head_to_head(judge, jc, prompts: list, by_policy: dict[str, list], pairs) -> dict[tuple, list[float]]:
    """The AI judge's P(a's reply is better than b's) on each prompt, for each (a, b) in `pairs`, with the
    [judge] options `jc` (both orders with jc.swap, so identical replies are an exact tie)."""
    return {(a, b): [j.p for j in judge_pairs(judge, prompts, by_policy[a], by_policy[b], swap=jc.swap,
                                              few_shot=jc.few_shot, cot=jc.cot)] for a, b in pairs}


def evaluate_run(cfg, task, sft_dir: Path, rm_dir: Path | None, policies: dict, rt: Runtime,
                 keep_completions: bool = False, toxicity_dir: Path | None = None, judge=None) -> dict:
    """Evaluate each named policy (e.g. {'sft': path, 'ppo': path, 'best_of_n': BestOfN(8, 1.0)}) on the same
    held-out prompts; with a reward model (rm_dir) its mean score is reported too (a DPO run has none); with a
    toxicity classifier (toxicity_dir: OUT/toxicity/model) each policy's toxicity_score; with an AI judge
    (rlhfkit.spine.judging.open_judge, asked as cfg.judge says) each policy's judge_win_rate against SFT's replies.
    keep_completions: also return every policy's completions ({"prompts": [...], "completions": {name: [...]}})."""
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    ref_policy = freeze(load_policy(sft_dir, rt.device, "reference policy"))
    scorer = build_scorer(cfg, task, rm_dir, rt) if rm_dir is not None else None  # the reward model(s), or reward.sources
    prompts = heldout_prompts(task, cfg.eval.n_prompts, cfg.seed)
    dist_prompt = cfg.eval.dist_prompt or prompts[0]
    sampling = SamplingParams.of(cfg.sampling)  # replies are drawn as every stage draws them
    results, dists = {}, {}
    for name, path in policies.items():
        if isinstance(path, BestOfN):  # sampled from the SFT policy, picked by the reward model
            results[name] = evaluate_best_of_n(ref_policy, tokenizer, scorer, task, prompts, path, rt, cfg.seed,
                                               sampling=sampling)
            continue
        # The SFT policy is the reference: reuse the loaded copy.
        policy = ref_policy if Path(path) == Path(sft_dir) else freeze(load_policy(path, rt.device, name))
        results[name] = evaluate_policy(policy, ref_policy, tokenizer, scorer, task, prompts, rt, cfg.seed, name=name,
                                        sampling=sampling)
        dists[name] = token_distributions(policy, tokenizer, dist_prompt, cfg.eval.dist_samples, task.max_new_tokens, rt,
                                          cfg.seed, sampling=sampling)
    if toxicity_dir is not None:  # P(toxic) of each reply, averaged per policy
        classifier = toxicity_classifier(toxicity_dir, rt)
        for name, r in results.items():
            score = toxicity_score(classifier, prompts, r["completions"])
            results[name] = beside_gold(r, "toxicity_score", score, task.gold_metric_names)
    completions = {name: r.pop("completions") for name, r in results.items()}
    if judge is not None:  # the share of prompts where the judge prefers the policy's reply to SFT's
        others = [n for n in results if n != "sft"]
        verdicts = judge_head_to_head(judge, cfg.judge, prompts, completions, [(n, "sft") for n in others])
        for n in others:
            outcomes = [win_outcome(p) for p in verdicts[(n, "sft")]]
            results[n]["judge_win_rate"] = sum(outcomes) / len(outcomes)
    result = {"policies": results, "distributions": distributions_record(dist_prompt, dists, tokenizer)}
    if keep_completions:
        result["completions"] = {"prompts": prompts, "by_policy": completions}
    return result
