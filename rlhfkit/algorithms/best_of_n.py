"""Best-of-N sampling: draw N completions from the SFT policy and answer with the one the reward model
scores highest. No training: the compute moves to inference (N samples and N reward-model scores per answer).

Nakano et al. (2021, WebGPT) and Stiennon et al. (2020) use it as the baseline every RL method must beat; Gao et
al. (2023, "Scaling Laws for Reward Model Overoptimization") plot the gold score of best-of-n against

    KL(pi_BoN || pi_SFT) = log n - (n - 1) / n                                  (Stiennon et al. 2020, App. G.3)

which Beirami et al. (2024, "Theoretical guarantees on the best-of-n alignment policy") show is an upper bound
(exact when no two samples tie). rlhfkit reports that bound as best-of-n's KL: the sampled distribution has no
per-token log-probs to measure it with.

The stage (`method = "best_of_n"`) trains nothing. It writes OUT/best_of_n/sampler.json (the base policy, the
reward model and N), which the evaluation samples from, and measures the best-of-n curve on `n_prompts`
training prompts: for n = 1, 2, 4, ..., N, the mean reward-model score and gold metrics of the best of the first
n samples (one sampling pass of N per prompt; the classic proxy-vs-gold plot). Phases:

    1. sample N completions per prompt from the SFT policy and score them (rlhfkit.spine.rollout, no log-probs)
    2. for each n, pick the best of the first n per prompt (best_of_groups) and log scores and gold metrics
    3. write sampler.json

Deviations: a response that never emitted EOS is only picked when no sample of its prompt did (the reward
model learned to read its score at an EOS; PPO lowers such scores by missing_eos_penalty for the same reason).
Ties go to the first sample.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core import dist
from rlhfkit.core.config import F
from rlhfkit.core.runio import MetricsLog, tracked, write_json
from rlhfkit.models.engine import gather_objects
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import SamplingParams
from rlhfkit.ops.selection import best_in_group
from rlhfkit.spine.reward_sources import build_scorer
from rlhfkit.spine.rollout import collect_rollouts
from rlhfkit.spine.self_training import my_share

SAMPLER_FILE = "sampler.json"
CHUNK = 256  # prompts sampled at a time (CHUNK x N rows): a large set never sits in one batch


@dataclass
class BestOfNConfig:
    """[best_of_n] Best-of-N sampling from the SFT policy, judged by the reward model; no training (rlhfkit/algorithms/best_of_n.py)."""

    n: int = F(8, "Completions sampled per prompt; the answer is the one the reward model scores highest.")
    temperature: float = F(1.0, "Sampling temperature.")
    n_prompts: int = F(512, "Training prompts on which the stage measures the best-of-n curve (n = 1, 2, 4, ..., N).")

    def validate(self, cfg, checks) -> None:
        """[best_of_n]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        checks.at_least_one("best_of_n.n", "best_of_n.n_prompts")
        checks.positive("best_of_n.temperature")


METHOD = Method("best_of_n", BestOfNConfig, ("sft", "reward"),
                (("reward-model score of the best of n", ("objective/scores",)),
                 ("gold metrics of the best of n (the truth)", ("gold/*",))),
                output="sampler", step_label="n (samples per prompt)", trains=False)


def best_of_n_kl(n: int) -> float:
    """log n - (n - 1) / n: the KL of best-of-n to the sampling policy (an upper bound; 0 at n = 1)."""
    return math.log(n) - (n - 1) / n


def best_of_groups(scores: torch.Tensor, k: int, ended: torch.Tensor | None = None) -> torch.Tensor:
    """(G,) row index of the best of each group of k consecutive rows (the rollout layout): the selection
    rules' best_in_group, except that a group where nothing ended still answers (with its best unended row):
    at inference every prompt gets an answer. Ties go to the first row of the group."""
    group = torch.arange(len(scores) // k, device=scores.device).repeat_interleave(k)
    ended = torch.ones_like(scores, dtype=torch.bool) if ended is None else ended
    eligible = ended | ~ended.view(-1, k).any(dim=1)[group]
    return best_in_group(scores, eligible, group).nonzero().squeeze(1)


@torch.no_grad()
def best_of_n_texts(policy, tokenizer, scorer, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float,
                    generator: torch.Generator, rt: Runtime, batch_size: int = 256,
                    sampling: SamplingParams | None = None):
    """The best-of-n completion of each prompt and its reward-model score: (texts, scores (P,)), sampling in
    batches of `batch_size` prompts (n rows each), with the [sampling] filters and stop strings `sampling`."""
    texts, scores = [], []
    for start in tracked(range(0, len(prompts), batch_size), f"best of {n}: {len(prompts)} prompts", unit="chunk"):
        r = collect_rollouts(policy, None, scorer, tokenizer, prompts[start : start + batch_size], k=n,
                             max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, rt=rt,
                             with_logprobs=False, sampling=sampling)
        best = best_of_groups(r.scores, n, r.ended)
        texts += [r.texts[i] for i in best.tolist()]
        scores.append(r.scores[best])
    return texts, torch.cat(scores)


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): the best-of-n curve on training prompts, and the
    sampler the evaluation uses."""
    start = time.time()
    bc = cfg.best_of_n
    sft_dir, rm_dir = out / "sft" / "model", out / "reward" / "model"
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    policy = load_policy(sft_dir, rt.device, "sft policy").eval()
    scorer = build_scorer(cfg, task, rm_dir, rt)

    # 1. N samples per prompt, scored (from the training prompt stream, never the evaluation's). Under several
    # processes each samples its contiguous share of the prompts from its own stream, and the shares are gathered.
    prompts = task.prompts(bc.n_prompts, random.Random(f"{cfg.seed}-best_of_n"))
    mine = my_share(prompts, "best_of_n")
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1_000_003 * dist.rank())
    texts, scores, ended = [], [], []
    for first in tracked(range(0, len(mine), CHUNK), f"best_of_n: {len(prompts)} prompts x {bc.n}", unit="chunk"):
        r = collect_rollouts(policy, None, scorer, tokenizer, mine[first : first + CHUNK], k=bc.n,
                             max_new_tokens=task.max_new_tokens, temperature=bc.temperature, generator=generator,
                             rt=rt, with_logprobs=False, sampling=SamplingParams.of(cfg.sampling))
        texts, scores, ended = texts + r.texts, scores + [r.scores.cpu()], ended + [r.ended.cpu()]
    parts = gather_objects((texts, torch.cat(scores), torch.cat(ended)))  # [one process's] alone
    texts = [t for part in parts for t in part[0]]
    scores, ended = (torch.cat([part[i] for part in parts]) for i in (1, 2))  # (P * N,), a prompt's N consecutive

    # 2. The curve: the best of the first n of each prompt's N samples, n = 1, 2, 4, ..., N.
    log = MetricsLog(stage_dir / "metrics.jsonl")
    ns = sorted({2**i for i in range(int(math.log2(bc.n)) + 1)} | {bc.n})
    for n in ns:
        first_n = torch.arange(len(prompts) * bc.n, device=scores.device).view(-1, bc.n)[:, :n].reshape(-1)
        best = first_n[best_of_groups(scores[first_n], n, ended[first_n])]
        picked = [texts[i] for i in best.tolist()]
        log.log({"step": n, "objective/scores": scores[best].mean().item(), "objective/kl": best_of_n_kl(n),
                 **{f"gold/{k}": v for k, v in task.gold_metrics(prompts, picked).items()}})
    log.close()

    # 3. What the evaluation samples from (by the main process: every process holds the same figures).
    if dist.is_main_process():
        write_json(stage_dir / SAMPLER_FILE, {"kind": "best_of_n", "policy": "sft/model",
                                              "reward_model": "reward/model", "n": bc.n, "temperature": bc.temperature})
    return {
        "n": bc.n,
        "kl_bound": best_of_n_kl(bc.n),
        # this stage's curve; each evaluated answer then costs n samples and n reward-model scores
        "passes": {"sampled": len(texts), "forward": len(texts), "backward": 0},
        "wall_time_s": time.time() - start,
    }
