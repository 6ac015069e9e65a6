"""The feedback stage with an AI labeler (feedback.labeler = 'ai'): the judge of [judge] labels every pair.

RLAIF (Lee et al. 2023, "RLAIF vs. RLHF", Sec. 2): an off-the-shelf LLM labels preference pairs; its preference
probability is kept as a soft label, and the reward model is trained on it by cross-entropy (distilled RLAIF,
rlhfkit/algorithms/reward.py with reward.soft_labels). Here the items are those the simulated labelers would get
(rlhfkit/feedback/simulated.py, sample_items: same prompts and completions for the same seed), so labels can be
compared item for item.

    1. Prompts and K completions each from the SFT policy (sample_items).
    2. Every pair (i, j), i < j, of an item's distinct completions goes to the judge, both orders with judge.swap:
       p_ij = P(completion i is better) (rlhfkit.models.judge.judge_pairs), in chunks with a progress bar; the
       judge's SQLite cache (judge.cache) keeps every finished batch, so a killed stage judges nothing twice. With
       judge.constitution (Constitutional AI's RL stage, Bai et al. 2022, Sec. 4.1) each pair is asked under a
       principle drawn at random: its comparison question fills the template's {principle}; with judge.clamp the
       probabilities are clamped into [0.5 - clamp, 0.5 + clamp] (the paper's 40-60% for chain of thought).
    3. Each pair becomes one comparison, chosen = the preferred completion, soft_label = max(p_ij, 1 - p_ij)
       (a pair at exactly 0.5 keeps i as chosen with soft label 0.5: no preference, nothing lost). The judge's
       ranking of the item (for reward.loss = 'plackett_luce') orders the completions by their mean probability
       of beating the others (identical texts tie): a Borda count over soft wins.
    4. How the judge behaves (stats.json): AI-labeler alignment with the task's gold labels on the pairs gold tells
       apart (Lee et al.'s metric), position bias (share of orders where the first-shown reply was preferred) and
       Lee et al.'s same-position rate, the mean soft label, and the cost (judge calls, inputs, tokens, cache hits).

Layer: feedback (imports spine, models, data, core).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.core.runio import progress, write_json
from rlhfkit.data.contract import Comparison, RankingRecord, ranking_from_scores, write_jsonl
from rlhfkit.feedback.simulated import sample_items
from rlhfkit.models.judge import (
    Judgement,
    JudgeTemplate,
    alignment,
    for_principle,
    judge_pairs,
    position_bias,
    same_position_rate,
)
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.constitution import load_constitution
from rlhfkit.spine.judging import open_judge

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config

AI_LABELER = "ai-judge"  # the labeler id on every comparison and ranking the judge makes
CHUNK = 32  # pairs per call to the judge: the progress bar's step (the judge batches within it)


def item_pairs(completions: list) -> list[tuple[int, int]]:
    """(i, j), i < j, for every pair of distinct texts among one item's completions (a repeated text is judged once:
    its first occurrence stands for it)."""
    first = {}
    for i, c in enumerate(completions):
        first.setdefault(repr(c), i)
    distinct = sorted(first.values())
    return [(a, b) for n, a in enumerate(distinct) for b in distinct[n + 1:]]


def soft_comparison(item_id: str, prompt, a, b, j: Judgement, criterion: str, principle: str | None = None) -> Comparison:
    """One comparison from the judge's P(a better) = j.p: the preferred reply chosen, its probability the soft label,
    the rationale(s) kept (both orders with swap, the first-shown order first), the principle asked (if any)."""
    rationale = "\n---\n".join(r for r in (j.rationale_ab, j.rationale_ba) if r) or None
    chosen, rejected, p = (a, b, j.p) if j.p >= 0.5 else (b, a, 1.0 - j.p)
    return Comparison(item_id=item_id, prompt=prompt, chosen=chosen, rejected=rejected, labeler_ids=[AI_LABELER],
                      criterion=criterion, soft_label=p, rationale=rationale, principle=principle)


def soft_ranking(completions: list, wins: dict[tuple[int, int], float]) -> list[list[int]]:
    """An item's ranking from its pairs' P(i beats j): each text scored by its mean probability of beating the
    other distinct texts, ties for identical texts (and exactly equal scores)."""
    texts = [repr(c) for c in completions]
    distinct = list(dict.fromkeys(texts))
    index = {t: texts.index(t) for t in distinct}  # a text's first occurrence, the one judged (item_pairs)
    p = {}
    for (i, j), p_ij in wins.items():
        p[(i, j)], p[(j, i)] = p_ij, 1.0 - p_ij
    score = {t: sum(p[(index[t], index[u])] for u in distinct if u != t) / max(len(distinct) - 1, 1) for t in distinct}
    return ranking_from_scores([score[t] for t in texts])


def principle_templates(template: JudgeTemplate, constitution: str, n: int, seed: int) -> list:
    """The question each of n pairs is asked: with a constitution (RL-CAI, Bai et al. 2022, Sec. 4.1), the template
    asking a principle drawn at random for that pair (a seeded stream: the same draws for the same seed and pairs);
    without one, None (the judge's own question) for every pair."""
    return [t for _, t in drawn_principles(template, constitution, n, seed)]


def drawn_principles(template: JudgeTemplate, constitution: str, n: int, seed: int) -> list[tuple]:
    """(principle name, template) for each of n pairs, as principle_templates draws them; (None, None) without a
    constitution. Pairs under one principle share one template object (the judge batches by it)."""
    if not constitution:
        return [(None, None)] * n
    principles = load_constitution(constitution).principles
    variants = [(p.name, for_principle(template, p.comparison)) for p in principles]  # lacking {principle} fails
    rng = random.Random(f"{seed}-feedback-principles")
    return [variants[rng.randrange(len(variants))] for _ in range(n)]


def _by_template(questions: list, ks) -> list[tuple]:
    """(template, [pair index, ...]) groups of the pairs `ks` by the question they are asked, in first-seen order."""
    groups: dict[int, tuple] = {}
    for k in ks:
        groups.setdefault(id(questions[k]), (questions[k], []))[1].append(k)
    return list(groups.values())


def clamped(j: Judgement, clamp: float) -> Judgement:
    """The judgement with P(a better) clamped into [0.5 - clamp, 0.5 + clamp] (clamp = 0: as it is). Bai et al. 2022
    (Sec. 4.1) clamp chain-of-thought labels to 40-60%: a rationale makes the judge's probabilities near 0 or 1."""
    if not clamp:
        return j
    return dataclasses.replace(j, p=min(max(j.p, 0.5 - clamp), 0.5 + clamp))


def judge_in_chunks(judge, jc, items: list[tuple], questions: list, desc: str) -> list[Judgement]:
    """A Judgement per (prompt, a, b) of `items`, P(a better) (both orders with jc.swap; clamped by jc.clamp), each
    asked under its template of `questions` (None = the judge's own), in chunks of CHUNK pairs with a progress bar;
    the judge's cache keeps every finished batch."""
    judgements: list[Judgement | None] = [None] * len(items)
    bar = progress(len(items), desc, unit="pair")
    for s in range(0, len(items), CHUNK):
        for tpl, ks in _by_template(questions, range(s, min(s + CHUNK, len(items)))):
            chunk = [items[k] for k in ks]
            out = judge_pairs(judge, [p for p, _, _ in chunk], [a for _, a, _ in chunk], [b for _, _, b in chunk],
                              swap=jc.swap, few_shot=jc.few_shot, cot=jc.cot, template=tpl)
            for k, jg in zip(ks, out):
                judgements[k] = clamped(jg, jc.clamp)
        bar.update(min(CHUNK, len(items) - s))
    bar.close()
    return judgements


def judge_behaviour(judge, judgements: list[Judgement], swap: bool) -> dict:
    """How the judge behaved: position bias, the same-position rate (with swap), and its cost."""
    stats = judge.stats
    return {
        "judge_position_bias": position_bias(judgements) if judgements else None,
        "judge_same_position_rate": same_position_rate(judgements) if judgements and swap else None,
        "judge_calls": stats.calls,
        "judge_inputs": stats.judged,
        "judge_cached": stats.cached,
        "judge_tokens": stats.tokens,
        "judge_bounded": stats.bounded,
        "judge_from_text": stats.from_text,
    }


def judge_agreement(cfg: Config, comparisons: list[Comparison], out_dir: Path, rt: Runtime, cache_path: Path,
                    source: str) -> dict:
    """AI-labeler alignment with labels people gave (Lee et al. 2023, Sec. 3.1): the judge of cfg.judge asked about
    each comparison of `source` (chosen and rejected as a and b; both orders with judge.swap; a principle drawn
    per pair with judge.constitution), and the share of them where it prefers the labelled `chosen` (a tie counts
    half), overall and per criterion; position bias and cost as the feedback stage reports them. Writes
    out_dir/judged.jsonl (the judge's own comparisons of the same pairs, soft labels and rationales: usable as AI
    labels) and out_dir/agreement.json."""
    start = time.time()
    jc = cfg.judge
    judge = open_judge(jc, rt, cache_path)
    drawn = drawn_principles(judge.template, jc.constitution, len(comparisons), cfg.seed)
    judgements = judge_in_chunks(judge, jc, [(c.prompt, c.chosen, c.rejected) for c in comparisons],
                                 [t for _, t in drawn], "judge agreement")
    judged = [soft_comparison(c.item_id, c.prompt, c.chosen, c.rejected, jg, c.criterion, principle)
              for c, jg, (principle, _) in zip(comparisons, judgements, drawn)]
    by_criterion: dict[str, list[Judgement]] = {}
    for c, jg in zip(comparisons, judgements):
        by_criterion.setdefault(c.criterion, []).append(jg)
    result = {
        "labels": source,
        "judge": jc.path or f"{jc.base_url} ({jc.model})",
        "n_comparisons": len(comparisons),
        "judge_alignment_with_labels": alignment(judgements, [True] * len(judgements)),
        "judge_alignment_by_criterion": {c: alignment(js, [True] * len(js)) for c, js in by_criterion.items()},
        **judge_behaviour(judge, judgements, jc.swap),
        "mean_soft_label": sum(c.soft_label for c in judged) / len(judged),
        "wall_time_s": time.time() - start,
    }
    write_jsonl(out_dir / "judged.jsonl", judged)
    write_json(out_dir / "agreement.json", result)
    return result


def run_ai_feedback(cfg: Config, task, sft_dir: Path, out_dir: Path, rt: Runtime, cache_path: Path) -> dict:
    """Label the items with the judge of cfg.judge (its cache at `cache_path`); write comparisons.jsonl,
    rankings.jsonl and stats.json to out_dir. With task = 'none' there is no gold scorer: no alignment figure."""
    start = time.time()
    has_gold = cfg.task != "none"
    fb, jc = cfg.feedback, cfg.judge
    criterion = fb.criteria[0]  # Config.validate: the judge labels one criterion, its template's question

    # 1. The items: prompts and K completions each (the simulated labelers' items for this seed).
    prompts, completions, _ = sample_items(cfg, task, sft_dir, rt)

    # 2. Every pair of distinct completions, both orders (judge.swap), in chunks (progress; cached per batch);
    #    with a constitution, each pair under a principle drawn at random (RL-CAI).
    judge = open_judge(jc, rt, cache_path)
    pairs = [(n, i, j) for n, comps in enumerate(completions) for i, j in item_pairs(comps)]
    drawn = drawn_principles(judge.template, jc.constitution, len(pairs), cfg.seed)
    judgements = judge_in_chunks(judge, jc, [(prompts[n], completions[n][i], completions[n][j]) for n, i, j in pairs],
                                 [t for _, t in drawn], "feedback: AI judge")

    # 3. Comparisons with soft labels, and the judge's ranking of each item.
    comparisons, rankings, wins = [], [], [{} for _ in prompts]
    for (n, i, j), jg, (principle, _) in zip(pairs, judgements, drawn):
        comps = completions[n]
        comparisons.append(soft_comparison(f"{task.name}-{n:06d}", prompts[n], comps[i], comps[j], jg, criterion,
                                           principle))
        wins[n][(i, j)] = jg.p
    for n, (prompt, comps) in enumerate(zip(prompts, completions)):
        rankings.append(RankingRecord(f"{task.name}-{n:06d}", prompt, comps, AI_LABELER, soft_ranking(comps, wins[n]),
                                      criterion=criterion))
    write_jsonl(out_dir / "rankings.jsonl", rankings)
    write_jsonl(out_dir / "comparisons.jsonl", comparisons)

    # 4. How the judge behaves: alignment with the gold labels, position bias, cost.
    gold = [(task.criterion_score(prompts[n], completions[n][i], criterion),
             task.criterion_score(prompts[n], completions[n][j], criterion)) for n, i, j in pairs] if has_gold else []
    told_apart = [k for k, (a, b) in enumerate(gold) if a != b]
    result = {
        "labeler": "ai",
        "judge": jc.path or f"{jc.base_url} ({jc.model})",
        "n_items": len(prompts),
        "k": fb.k,
        "n_comparisons": len(comparisons),
        "comparisons_per_item": len(comparisons) / len(prompts),
        "judge_alignment_with_gold": (alignment([judgements[k] for k in told_apart],
                                                [gold[k][0] > gold[k][1] for k in told_apart]) if told_apart else None),
        "n_gold_pairs": len(told_apart),
        **judge_behaviour(judge, judgements, jc.swap),
        "mean_soft_label": sum(c.soft_label for c in comparisons) / max(len(comparisons), 1),
        "wall_time_s": time.time() - start,
    }
    write_json(out_dir / "stats.json", result)
    return result
