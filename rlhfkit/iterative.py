"""The spine of the self-training methods, which alternate sampling from the policy and fine-tuning it on the
samples the reward model rates best: rejection sampling (rlhfkit/algorithms/rejection_sampling.py) and ReST
(rlhfkit/algorithms/rest.py). What differs between them (which samples are kept) is in their own files and
rlhfkit/ops/selection.py; what they share is here:

- `grow`: K samples per prompt from the current policy, scored by the reward model, with the policy's and the
  reference's log-probs for the KL of the sampled set (rlhfkit.rollout.collect_rollouts, PPO's rollout code),
  in chunks of prompts so a large set never sits in one batch;
- `fine_tune`: SFT's own loop (rlhfkit.algorithms.sft.fit_completions) on the kept (prompt, completion) pairs;
- the round directories: each round (ReST: iteration) N runs in STAGE/<prefix>-N/, which holds its samples as
  JSONL, its fine-tuning metrics and the model after it, and counts once COMPLETE.json is written, last.
  A killed run resumes after the last complete round (`resume_point`): the round it was in is redone from
  the start. Every random draw of a round comes from seeds derived from (seed, method, round)
  (`round_seed`), so the redone round draws exactly what the interrupted one drew: no RNG state is saved,
  and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.data.batching import encode_pairs
from rlhfkit.rollout import collect_rollouts
from rlhfkit.runio import MetricsLog, is_complete
from rlhfkit.training import Runtime


@dataclass
class GrowSet:
    """K scored samples per prompt. B = prompts x K rows; a prompt's K samples are consecutive rows."""

    prompts: list[str]  # (B,) the prompt of each row
    texts: list[str]  # (B,) decoded responses (every token before EOS), what the reward model scored
    group: torch.Tensor  # (B,) index of the row's prompt
    scores: torch.Tensor  # (B,) raw reward-model scores
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    kl: torch.Tensor  # (B,) sum over the response of log pi(y_t) - log pi_ref(y_t) (k1), at the sampling temperature


@torch.no_grad()
def grow(policy, reference, scorer, tokenizer, prompts: list[str], *, k: int, max_new_tokens: int,
         temperature: float, generator: torch.Generator, rt: Runtime, chunk: int = 256) -> GrowSet:
    """Sample k responses for each prompt from `policy`, score them and measure their KL to `reference`,
    `chunk` prompts (chunk * k rows) at a time."""
    parts = []
    for start in range(0, len(prompts), chunk):
        r = collect_rollouts(policy, reference, scorer, tokenizer, prompts[start : start + chunk], k=k,
                             max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, rt=rt)
        parts.append((r, r.group + start, (r.logprobs - r.ref_logprobs).sum(1)))  # log-probs are 0 outside the mask
    return GrowSet([p for r, _, _ in parts for p in r.prompts], [t for r, _, _ in parts for t in r.texts],
                   torch.cat([g for _, g, _ in parts]), torch.cat([r.scores for r, _, _ in parts]),
                   torch.cat([r.ended for r, _, _ in parts]), torch.cat([kl for _, _, kl in parts]))


def grow_metrics(g: GrowSet, task) -> dict:
    """The sampled set as the policy that sampled it produced it: mean score, KL, missing EOS, gold metrics."""
    return {
        "objective/scores": g.scores.mean().item(),
        "objective/kl_k1": g.kl.mean().item(),
        "objective/no_eos_rate": (~g.ended).float().mean().item(),
        **{f"gold/{k}": v for k, v in task.gold_metrics(g.prompts, g.texts).items()},
    }


def write_samples(path: Path, g: GrowSet, **columns: list) -> None:
    """The sampled set as JSONL, one row per sample: prompt, completion, score, ended, group, and `columns`
    (e.g. kept). Written to a temporary name and renamed, so a file under the real name is whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(len(g.texts)):
            row = {"prompt": g.prompts[i], "completion": g.texts[i], "score": g.scores[i].item(),
                   "ended": bool(g.ended[i]), "group": int(g.group[i]), **{k: v[i] for k, v in columns.items()}}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def fine_tune(policy, tokenizer, prompts: list[str], completions: list[str], *, epochs: int, batch_size: int,
              lr: float, seed: int, rt: Runtime, log: MetricsLog | None, desc: str, step_offset: int = 0) -> dict:
    """SFT's loop (fit_completions) on the kept pairs, its order drawn from `seed`; the global torch RNG is
    seeded too (a user's model may train with dropout). Returns steps, mean loss and sequences backpropagated."""
    from rlhfkit.algorithms.sft import fit_completions

    data = [t.to(rt.device) for t in encode_pairs(tokenizer, prompts, completions)]
    torch.manual_seed(seed)
    fit = fit_completions(policy, data, epochs=epochs, batch_size=batch_size, lr=lr, rt=rt,
                          generator=torch.Generator().manual_seed(seed), log=log, desc=desc, step_offset=step_offset)
    return {**fit, "backward": fit["steps"] * min(batch_size, len(prompts))}


def round_seed(seed: int, method: str, n: int, what: str) -> int:
    """A seed for one random stream (`what`) of round `n`, the same in every process."""
    return random.Random(f"{seed}-{method}-{n}-{what}").getrandbits(62)


def round_dir(stage_dir: Path, prefix: str, n: int) -> Path:
    return Path(stage_dir) / f"{prefix}-{n}"


def resume_point(stage_dir: Path, prefix: str, total: int) -> int:
    """The number of rounds 1..N that are complete, in order; the directories of later rounds (an
    interrupted one) are removed, so that round starts afresh."""
    done = 0
    while done < total and is_complete(round_dir(stage_dir, prefix, done + 1)):
        done += 1
    for path in Path(stage_dir).glob(f"{prefix}-*"):
        suffix = path.name[len(prefix) + 1:]
        if suffix.isdigit() and int(suffix) > done:
            shutil.rmtree(path)
    return done
