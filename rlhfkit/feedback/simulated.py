"""The feedback stage with simulated labelers: sample K completions per prompt, rank, form comparisons.

Each simulated labeler ranks by the task's gold score, misjudging each completion by one gold point
(up or down at random) with probability `error_rate`; equal perceived scores are ties. Several labelers
rank every item and a consensus turns their rankings into comparisons (rlhfkit.feedback.agreement).

With `feedback.strengths`, each labeler also says how much better each tie group is than the next, as
Llama 2's labelers did (Touvron et al. 2023, Sec. 3.2.1), from the gap between the groups' perceived gold
scores (`strength_label`); a comparison's margin is then the mean over its supporters of the strongest step
between the two completions (contract.pair_margin, the labeling app's rule) under `feedback.strength_margins`.
The strengths are read off the perceived scores, drawing no random number: the rankings are the same with
or without them.

With `feedback.kind = "thumbs"`, each labeler instead gives each completion a thumb up or down (KTO's binary
feedback): up when its perceived gold score (misjudged by one point with probability `error_rate`, as above) is
at least `feedback.thumb_threshold`. The budget is the same: a ranking of K completions is K judgements, and a
labeler gives K thumbs per item.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhfkit.core.runio import write_json
from rlhfkit.data.consensus import borda_consensus, majority_pairs
from rlhfkit.data.contract import (
    STRENGTH_MARGINS,
    Comparison,
    Ranking,
    RankingRecord,
    Thumb,
    pair_margin,
    ranking_from_scores,
    ranking_to_pairs,
    write_jsonl,
)
from rlhfkit.feedback.agreement import mean_agreement, pairwise_agreement
from rlhfkit.feedback.krippendorff import alpha_for_rankings
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import SamplingParams, sample_texts

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config


# Strength of a step between adjacent tie groups from its perceived gold gap, in gold points (the unit of the
# labelers' noise): (lowest gap, label), strongest first; a smaller gap is "negligibly" better.
STRENGTH_GAPS = ((1.0, "significantly"), (2.0 / 3.0, "better"), (1.0 / 3.0, "slightly"))


def strength_label(gap: float) -> str:
    """The strength a simulated labeler states for a step whose perceived gold gap is `gap` (> 0)."""
    return next((label for least, label in STRENGTH_GAPS if gap >= least - 1e-9), "negligibly")  # thirds: exact ties


def simulated_ranking(gold: list[float], error_rate: float, rng: random.Random,
                      strengths: bool = False) -> tuple[Ranking, list[str] | None]:
    """One labeler's ranking: gold scores, each misjudged by +-1 with probability error_rate; with `strengths`,
    also the strength of each step between adjacent tie groups (from the perceived gap), else None."""
    perceived = [g + (rng.choice((-1.0, 1.0)) if rng.random() < error_rate else 0.0) for g in gold]
    ranking = ranking_from_scores(perceived)
    if not strengths:
        return ranking, None
    level = [perceived[group[0]] for group in ranking]  # (groups,) best first
    return ranking, [strength_label(a - b) for a, b in zip(level, level[1:])]


def simulated_thumb(gold: float, error_rate: float, threshold: float, rng: random.Random) -> bool:
    """One labeler's thumb on one completion: up when the gold score, misjudged by +-1 with probability error_rate
    (simulated_ranking's noise), is at least `threshold`."""
    perceived = gold + (rng.choice((-1.0, 1.0)) if rng.random() < error_rate else 0.0)
    return perceived >= threshold


def consensus_comparisons(item_id, prompt, completions, rankings, labeler_ids, rule: str,
                          strengths: list[list[str] | None] | None = None,
                          margins: dict[str, float] = STRENGTH_MARGINS) -> list[Comparison]:
    """Comparisons from several labelers' rankings of one item; pairs of identical texts are dropped. With
    `strengths` (per labeler, or None where a labeler gave none), each comparison's margin is the mean over its
    supporters of pair_margin under `margins`; without any, the margin is None (unknown)."""
    strengths = strengths or [None] * len(rankings)
    if rule == "majority":
        pairs = [(i, j, list(support)) for i, j, support in majority_pairs(rankings)]
    else:
        consensus = borda_consensus(rankings)
        prefers = [set(ranking_to_pairs(r)) for r in rankings]
        pairs = [(i, j, [n for n, p in enumerate(prefers) if (i, j) in p]) for i, j in ranking_to_pairs(consensus)]

    def margin(i: int, j: int, support: list[int]) -> float | None:
        given = [pair_margin(rankings[n], strengths[n], i, j, margins) for n in support if strengths[n] is not None]
        return sum(given) / len(given) if given else None

    return [
        Comparison(item_id=item_id, prompt=prompt, chosen=completions[i], rejected=completions[j],
                   margin=margin(i, j, support), labeler_ids=[labeler_ids[n] for n in support])
        for i, j, support in pairs
        if completions[i] != completions[j]
    ]


def sample_items(cfg: Config, task, sft_dir: Path, rt: Runtime) -> tuple[list, list[list], random.Random]:
    """The items to label: feedback.n_prompts prompts and K completions each from the SFT policy, and the stage's
    random stream after drawing them. Every labeler (simulated, AI) gets the same items for the same seed, so their
    labels can be compared item for item."""
    fb = cfg.feedback
    rng = random.Random(f"{cfg.seed}-feedback")
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    model = load_policy(sft_dir, rt.device, "sft policy").eval()
    prompts = task.prompts(fb.n_prompts, rng)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    completions = sample_texts(model, tokenizer, prompts, fb.k, max_new_tokens=task.max_new_tokens, generator=generator,
                               temperature=fb.temperature, dtype=rt.dtype, batch_size=512, desc="feedback: sampling",
                               sampling=SamplingParams.of(cfg.sampling))
    return prompts, completions, rng


def run_simulated_feedback(cfg: Config, task, sft_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    if cfg.feedback.kind == "thumbs":
        return run_simulated_thumbs(cfg, task, sft_dir, out_dir, rt)
    start = time.time()
    fb = cfg.feedback

    # 1. Prompts and K completions each from the SFT policy.
    prompts, completions, rng = sample_items(cfg, task, sft_dir, rt)

    # 2. Each labeler ranks each item (and states strengths); 3. the consensus becomes comparisons.
    labeler_ids = [f"sim-{n}" for n in range(fb.labelers_per_item)]
    margins = dict(zip(STRENGTH_MARGINS, fb.strength_margins, strict=True))  # label -> margin, the configured table
    rankings: list[RankingRecord] = []
    comparisons: list[Comparison] = []
    per_item, gold_agree, gold_total = [], 0, 0
    with_gold = []
    for i, (prompt, comps) in enumerate(zip(prompts, completions)):
        item_id = f"{task.name}-{i:06d}"
        for criterion in fb.criteria:  # each criterion ranked on its own, by the task's gold rule for it
            gold = [task.criterion_score(prompt, c, criterion) for c in comps]
            labels = [simulated_ranking(gold, fb.error_rate, rng, fb.strengths) for _ in labeler_ids]
            item_rankings = [r for r, _ in labels]
            item_strengths = [s for _, s in labels]
            per_item.append(item_rankings)
            rankings += [RankingRecord(item_id, prompt, comps, lid, r, criterion=criterion, strengths=s)
                         for lid, (r, s) in zip(labeler_ids, labels)]
            item_comparisons = [dataclasses.replace(c, criterion=criterion) for c in consensus_comparisons(
                item_id, prompt, comps, item_rankings, labeler_ids, fb.consensus, item_strengths, margins)]
            comparisons += item_comparisons
            by_text = dict(zip(comps, gold))
            for c in item_comparisons:
                gold_total += 1
                gold_agree += by_text[c.chosen] > by_text[c.rejected]
            gold_ranking = ranking_from_scores(gold)
            with_gold += [pairwise_agreement(r, gold_ranking) for r in item_rankings]

    # 4. Agreement between labelers and with the gold ranking; write the data contract files.
    agreement = mean_agreement(per_item)
    write_jsonl(out_dir / "rankings.jsonl", rankings)
    write_jsonl(out_dir / "comparisons.jsonl", comparisons)
    result = {
        "n_items": len(prompts),
        "k": fb.k,
        "labelers_per_item": fb.labelers_per_item,
        "n_comparisons": len(comparisons),
        "comparisons_per_item": len(comparisons) / len(prompts),
        "labeler_pairwise_agreement": agreement["pairwise_agreement"],
        "labeler_kendall_tau": agreement["kendall_tau"],
        "labeler_krippendorff_alpha": alpha_for_rankings(dict(enumerate(per_item)), metric="ordinal"),
        "labeler_agreement_with_gold": sum(with_gold) / len(with_gold),
        "comparison_accuracy_vs_gold": gold_agree / max(gold_total, 1),
        "judgements": len(rankings) * fb.k,  # the labelling budget: completions judged (a K-way ranking costs K)
        "wall_time_s": time.time() - start,
    }
    write_json(out_dir / "stats.json", result)
    return result


def run_simulated_thumbs(cfg: Config, task, sft_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """feedback.kind = 'thumbs': the same items as rankings would get (sample_items), each completion given a
    thumb by each labeler (simulated_thumb); writes thumbs.jsonl (the data contract) and stats.json."""
    start = time.time()
    fb = cfg.feedback

    # 1. Prompts and K completions each from the SFT policy (the same items as for rankings at this seed).
    prompts, completions, rng = sample_items(cfg, task, sft_dir, rt)

    # 2. Each labeler gives each completion a thumb, per criterion.
    labeler_ids = [f"sim-{n}" for n in range(fb.labelers_per_item)]
    thumbs: list[Thumb] = []
    agree, correct, total, completions_judged = 0, 0, 0, 0
    for i, (prompt, comps) in enumerate(zip(prompts, completions)):
        item_id = f"{task.name}-{i:06d}"
        for criterion in fb.criteria:
            for c in comps:
                gold = task.criterion_score(prompt, c, criterion)
                labels = [simulated_thumb(gold, fb.error_rate, fb.thumb_threshold, rng) for _ in labeler_ids]
                thumbs += [Thumb(item_id, prompt, c, up, lid, criterion) for lid, up in zip(labeler_ids, labels)]
                truth = gold >= fb.thumb_threshold
                correct += sum(up == truth for up in labels)
                total += len(labels)
                agree += len(set(labels)) == 1
                completions_judged += 1

    # 3. Write the data contract file and the labels' quality.
    write_jsonl(out_dir / "thumbs.jsonl", thumbs)
    result = {
        "kind": "thumbs",
        "n_items": len(prompts),
        "k": fb.k,
        "labelers_per_item": fb.labelers_per_item,
        "n_thumbs": len(thumbs),
        "judgements": len(thumbs),  # the labelling budget: one completion judged per thumb
        "thumbs_up_share": sum(t.label for t in thumbs) / len(thumbs),
        "thumb_accuracy_vs_gold": correct / total,
        "labeler_unanimity": agree / completions_judged,  # share of completions all labelers thumbed alike
        "wall_time_s": time.time() - start,
    }
    write_json(out_dir / "stats.json", result)
    return result
