"""The spine of the self-training methods, which alternate sampling from the policy and fine-tuning it on the
samples the reward model rates best: rejection sampling (rlhfkit/algorithms/rejection_sampling.py) and ReST
(rlhfkit/algorithms/rest.py); online DPO (rlhfkit/algorithms/online_dpo.py) shares the rounds too, with DPO on
the best-vs-worst pairs as its improve step (it gets the reference, RoundContext.reference). What differs between
them (which samples are kept, how many fine-tuning steps a round makes) is in their own files and
rlhfkit/ops/selection.py; what they share is here:

- `run_rounds`: the round loop itself. Setup (tokenizer; the policy and reference from the one factory,
  rlhfkit.models.reference, so `lora.r` trains adapters here as everywhere; the reward), then per round:
  1. Grow: K samples per prompt from the current policy, scored, with their KL to the reference (`grow`);
  2-3. the method's `improve(ctx)`: select, write the samples, fine-tune (`fine_tune`), one metrics line per
     fine-tuning step;
  4. save the round's model, log its lines, mark the round complete;
  and the final save;
- `grow`: rlhfkit.spine.rollout.collect_rollouts in chunks of prompts, so a large set never sits in one batch;
- several processes (`accelerate launch`): each samples a contiguous 1/N of the round's prompts (a prompt's K
  samples stay together) from its own random stream (process 0's is a single process's), the sets are gathered so
  that every process selects the same samples, and the fine-tuning is SFT's loop over the processes (DDP: a
  per-round optimiser is not worth sharding, so train.sharding does not apply here); the main process writes;
- `fine_tune`: SFT's own loop (rlhfkit.spine.finetune.fit_completions) on the kept (prompt, completion) pairs;
- the round directories: each round (ReST: iteration) N runs in STAGE/<prefix>-N/, which holds its samples as
  JSONL, its fine-tuning metrics and the model after it, and counts once COMPLETE.json is written, last.
  A killed run resumes after the last complete round (`resume_point`): the round it was in is redone from
  the start. Every random draw of a round comes from seeds derived from (seed, method, round)
  (`round_seed`), so the redone round draws exactly what the interrupted one drew: no RNG state is saved,
  and a resumed run equals an uninterrupted one.

Layer: spine (imports models, data, ops, core).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.core import dist
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import MetricsLog, is_complete, mark_complete, progress, stage_result, tracked
from rlhfkit.data.batching import encode_pairs
from rlhfkit.models.engine import barrier, gather_objects, save_pretrained
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reference import policy_and_reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import SamplingParams
from rlhfkit.spine.finetune import fit_completions
from rlhfkit.spine.reward_sources import build_scorer
from rlhfkit.spine.rollout import collect_rollouts


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
         temperature: float, generator: torch.Generator, rt: Runtime, chunk: int = 256, desc: str = "sampling",
         sampling: SamplingParams | None = None) -> GrowSet:
    """Sample k responses for each prompt from `policy` (with the [sampling] filters and stop strings), score them
    and measure their KL to `reference`, `chunk` prompts (chunk * k rows) at a time, with a progress bar over the
    chunks."""
    parts = []
    for start in tracked(range(0, len(prompts), chunk), f"{desc}: {len(prompts)} prompts x {k}", unit="chunk"):
        r = collect_rollouts(policy, reference, scorer, tokenizer, prompts[start : start + chunk], k=k,
                             max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, rt=rt,
                             sampling=sampling)
        parts.append((r, r.group + start, (r.logprobs - r.ref_logprobs).sum(1)))  # log-probs are 0 outside the mask
    return GrowSet([p for r, _, _ in parts for p in r.prompts], [t for r, _, _ in parts for t in r.texts],
                   torch.cat([g for _, g, _ in parts]), torch.cat([r.scores for r, _, _ in parts]),
                   torch.cat([r.ended for r, _, _ in parts]), torch.cat([kl for _, _, kl in parts]))


def my_share(prompts: list[str], name: str) -> list[str]:
    """This process's contiguous 1/N of a round's prompts (all of them in one process)."""
    world, rank = dist.world_size(), dist.rank()
    if len(prompts) % world:
        raise ConfigError(f"{name}.n_prompts = {len(prompts)} does not split evenly over {world} processes; make it "
                          f"a multiple of them")
    share = len(prompts) // world
    return prompts[rank * share : (rank + 1) * share]


def gather_grow(g: GrowSet, share: int) -> GrowSet:
    """The processes' Grow sets as one, in rank order (process r's prompts are r * share onwards), on every process."""
    if not dist.is_distributed():
        return g
    device = g.scores.device
    parts = gather_objects((g.prompts, g.texts, g.group.cpu(), g.scores.cpu(), g.ended.cpu(), g.kl.cpu()))
    return GrowSet([p for part in parts for p in part[0]], [t for part in parts for t in part[1]],
                   torch.cat([part[2] + r * share for r, part in enumerate(parts)]).to(device),
                   *(torch.cat([part[i] for part in parts]).to(device) for i in (3, 4, 5)))


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
    (e.g. kept). Written to a temporary name and renamed, so a file under the real name is whole. By the main
    process only (every process holds the same set)."""
    if not dist.is_main_process():
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(len(g.texts)):
            row = {"prompt": g.prompts[i], "completion": g.texts[i], "score": g.scores[i].item(),
                   "ended": bool(g.ended[i]), "group": int(g.group[i]), **{k: v[i] for k, v in columns.items()}}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def fine_tune(policy, tokenizer, prompts: list[str], completions: list[str], *, epochs: int, batch_size: int,
              lr: float, seed: int, rt: Runtime, log: MetricsLog | None, desc: str, step_offset: int = 0,
              alone: bool = False) -> dict:
    """SFT's loop (fit_completions) on the kept pairs, its order drawn from `seed`; the global torch RNG is
    seeded too (a user's model may train with dropout). Under several processes every one calls it with the same
    pairs and each takes its share of every batch (DDP); alone: this process fine-tunes by itself (a stage run on
    the main process only, SL-CAI). Returns steps, mean loss and sequences backpropagated."""
    data = encode_pairs(tokenizer, prompts, completions)  # host memory (Runtime.put)
    torch.manual_seed(seed)
    fit = fit_completions(policy, data, epochs=epochs, batch_size=batch_size, lr=lr, rt=replace(rt, sharding="none"),
                          generator=torch.Generator().manual_seed(seed), log=log, desc=desc, step_offset=step_offset,
                          alone=alone)
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
    barrier()  # every process has read the markers before the main one removes anything
    for path in Path(stage_dir).glob(f"{prefix}-*") if dist.is_main_process() else ():
        suffix = path.name[len(prefix) + 1:]
        if suffix.isdigit() and int(suffix) > done:
            shutil.rmtree(path)
    barrier()
    return done


@dataclass
class RoundContext:
    """What a method's improve step gets for round n."""

    n: int  # the round (ReST: iteration), from 1
    dir: Path  # STAGE/<prefix>-n/: write the round's samples here
    grow: GrowSet  # the round's sampled set
    seed: Callable[[str], int]  # seed(what): a seed for one random stream of this round (round_seed)
    log: MetricsLog  # the round's fine-tuning metrics, STAGE/<prefix>-n/metrics.jsonl
    policy: object  # trained in place
    tokenizer: object
    reference: object = None  # pi_ref, the SFT policy (rlhfkit.models.reference.Reference): online DPO's reference


@dataclass
class RoundResult:
    """What a method's improve step made of a round."""

    records: list[dict]  # one line of the stage's metrics.jsonl per fine-tuning step (step numbers included)
    steps: int  # optimiser steps
    backward: int  # sequences backpropagated
    postfix: dict  # shown on the progress bar
    forward: int = 0  # sequences forwarded without grad beyond the Grow step's (online DPO: the reference's pass)


def run_rounds(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime, *, name: str, prefix: str,
               rounds: int, lines_per_round: int, n_prompts: int, k: int, temperature: float, unit: str,
               improve: Callable[[RoundContext], RoundResult]) -> tuple[list[dict], dict]:
    """Run `rounds` rounds into out_dir, resuming after the last complete one; save the final policy in
    out_dir/model. Returns every round's result (its COMPLETE.json: records, passes, steps, wall_time_s) and the
    figures every self-training stage reports (rounds_summary)."""
    start_time = time.time()
    done = resume_point(out_dir, prefix, rounds)
    previous = [_round_result(round_dir(out_dir, prefix, n)) for n in range(1, done + 1)]
    if previous:
        start_time -= previous[-1]["wall_time_s"]  # the whole run's time, across the interruption

    # Setup: the policy (SFT, or the last complete round's), the reference (the SFT policy), the reward model.
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    policy, reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed, resume_from=(
        round_dir(out_dir, prefix, done) / "model" if done else None))
    scorer = build_scorer(cfg, task, rm_dir, rt)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=done * lines_per_round)
    bar = progress(rounds * lines_per_round, name, unit=unit)
    bar.update(done * lines_per_round)

    for n in range(done + 1, rounds + 1):
        rdir = round_dir(out_dir, prefix, n)
        if dist.is_main_process():
            rdir.mkdir(parents=True)

        # 1. Grow: K completions per prompt from the current policy, scored, KL to the reference (each process
        # its share of the prompts from its own stream, then gathered).
        seed = lambda what, n=n: round_seed(cfg.seed, name, n, what)  # noqa: E731 (per round: resume-exact)
        mine = my_share(task.prompts(n_prompts, random.Random(seed("prompts"))), name)
        rank = dist.rank()
        generator = torch.Generator(device=rt.device).manual_seed(seed("sample" if rank == 0 else f"sample-{rank}"))
        g = grow(policy, reference, scorer, tokenizer, mine, k=k, max_new_tokens=task.max_new_tokens,
                 temperature=temperature, generator=generator, rt=rt, desc=f"{name} {prefix} {n}: sampling",
                 sampling=SamplingParams.of(cfg.sampling))
        g = gather_grow(g, len(mine))

        # 2-3. The method's own: which samples to keep, and fine-tuning the policy on them.
        round_log = MetricsLog(rdir / "metrics.jsonl")
        result = improve(RoundContext(n, rdir, g, seed, round_log, policy, tokenizer, reference))
        round_log.close()

        # 4. Save the round's model, log it, mark it complete (last: a round without the marker is redone).
        save_pretrained(policy, tokenizer, rdir / "model")  # by the main process, the others wait
        for record in result.records:
            log.log(record)
        passes = {"sampled": len(g.texts), "forward": 3 * len(g.texts) + result.forward,
                  "backward": result.backward}
        previous.append({"records": result.records, "passes": passes, "steps": result.steps,
                         "wall_time_s": time.time() - start_time})
        if dist.is_main_process():
            mark_complete(rdir, previous[-1])
        bar.update(len(result.records))
        bar.set_postfix(**result.postfix, refresh=False)
    bar.close()
    log.close()

    save_pretrained(policy, tokenizer, out_dir / "model")
    return previous, rounds_summary(previous, time.time() - start_time, resumed=done > 0)


def rounds_summary(previous: list[dict], wall_time_s: float, resumed: bool) -> dict:
    """The figures every self-training stage reports: optimiser steps, the last round's sampled set (its first
    line: before that round's fine-tuning), whether it resumed, the passes through a model (K per prompt
    sampled; reward model, policy and reference without grad; the kept samples with grad in every fine-tuning
    step) and the wall time."""
    last = previous[-1]["records"][0]
    return {
        "steps": sum(p["steps"] for p in previous),
        "final_scores": last["objective/scores"],
        "final_kl": last["objective/kl_k1"],
        "resumed": resumed,
        "passes": {k: sum(p["passes"][k] for p in previous) for k in ("sampled", "forward", "backward")},
        "wall_time_s": wall_time_s,
    }


def _round_result(rdir: Path) -> dict:
    """A complete round's COMPLETE.json (an earlier rlhfkit wrote rejection sampling's one line as "record")."""
    result = stage_result(rdir)
    if "record" in result:
        result["records"] = [result.pop("record")]
    return result
