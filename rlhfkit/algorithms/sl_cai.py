"""SL-CAI, the supervised stage of Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback", Sec. 3): the policy critiques and revises its own replies to red-team prompts under principles drawn from
a written constitution, then is fine-tuned on its final revisions, mixed with helpful demonstrations.

    1. n_prompts prompts from the task's training prompts (the red-team prompts: data.prompts for your own), and
       n_helpful helpful demonstrations: the best of the task's by its gold score (the paper mixes in helpfulness
       samples; the courtesy task's SFT data is partly rude on purpose)
    2. the critique -> revision chains of the SFT policy, `rounds` rounds each with a principle drawn at random
       (rlhfkit.spine.constitution.critique_revision_chains: batched, through the policy's chat template), written
       to STAGE/chains.jsonl for the report
    3. fine-tune the SFT policy on (prompt, final revision) pairs plus the helpful demonstrations with SFT's loop
       (rlhfkit.spine.finetune; LoRA adapters with lora.r > 0), loss on completion tokens
    4. save STAGE/model (the SL-CAI policy) and its figures: the completion NLL of the revisions before and after
       the fine-tuning (did the policy learn its own revisions), the share of chains whose revision differs from
       the first response, the mean lengths

The RL stage (RL-CAI: the AI judge labels pairs of the SL-CAI policy's replies under a drawn principle's comparison
question, a reward model learns them, an online method optimises against it) runs on this policy; docs/cai.md.

Deviations (besides those of rlhfkit/spine/constitution.py): the paper fine-tunes a pretrained model on the
revisions; this stage fine-tunes the run's SFT policy, the one that wrote them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.core.runio import MetricsLog, write_json
from rlhfkit.data.batching import encode_pairs
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reference import policy_and_reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.constitution import DEFAULT_CONSTITUTION, critique_revision_chains, load_constitution, write_chains
from rlhfkit.spine.finetune import evaluate_nll
from rlhfkit.spine.self_training import fine_tune


@dataclass
class SLCAIConfig:
    """[sl_cai] Constitutional AI's supervised stage: critique -> revision chains of the SFT policy, then SFT on the revisions (rlhfkit/algorithms/sl_cai.py; docs/cai.md)."""

    constitution: str = F("", "The constitution (TOML: [[principles]] with critique_request, revision_request, comparison; optional [[examples]]); empty = rlhfkit's harmlessness constitution (rlhfkit/spine/constitutions/harmless.toml).")
    n_prompts: int = F(256, "Red-team prompts (from the task's training prompts, or data.prompts) whose replies are critiqued and revised.")
    rounds: int = F(1, "Critique -> revision rounds per prompt, each with a principle drawn at random.")
    few_shot: bool = F(True, "Show the constitution's [[examples]] before each critique and revision request.")
    temperature: float = F(0.0, "Sampling temperature of the responses, critiques and revisions; 0 = greedy.")
    max_new_tokens: int = F(0, "Token budget of each response, critique and revision; 0 = twice the task's reply budget.")
    n_helpful: int = F(256, "Helpful demonstrations (the task's SFT data) mixed into the fine-tuning, as the paper mixes helpfulness samples.")
    epochs: int = F(2, "Passes over the revisions and helpful demonstrations.")
    batch_size: int = F(16, "Sequences per optimiser step.")
    lr: float = F(1e-3, "AdamW learning rate (linear decay to 10%); with policy.path, 2e-5 (2e-4 with LoRA) unless set.")

    # lr for a pretrained policy.path: SFT's (TRL 1.12's SFTConfig.learning_rate; x10 for LoRA).
    PRETRAINED_LR = (2e-5, 2e-4)

    def validate(self, cfg, checks) -> None:
        """[sl_cai]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        checks.at_least_one("sl_cai.n_prompts", "sl_cai.rounds", "sl_cai.epochs", "sl_cai.batch_size")
        checks.positive("sl_cai.lr")
        checks.need(self.temperature >= 0, "sl_cai.temperature", "must be >= 0 (0 = greedy)")
        checks.need(self.max_new_tokens >= 0, "sl_cai.max_new_tokens", "must be >= 0 (0 = twice the task's)")
        checks.need(self.n_helpful >= 0, "sl_cai.n_helpful", "must be >= 0 (0 = the revisions alone)")


METHOD = Method("sl_cai", SLCAIConfig, ("sft",), (("fine-tuning loss on revisions and helpful demonstrations",
                                                   ("loss/sft",)),), step_label="fine-tuning step", needs_chat=True)


def helpful_demonstrations(task, n: int, rng: random.Random, gold: bool) -> list[tuple]:
    """The n best of 4n of the task's demonstrations by its gold score (the courtesy task's SFT data is partly rude on
    purpose; the paper mixes in helpful samples only); with no gold scorer (task = 'none'), the first n of yours."""
    if n == 0:
        return []
    pool = task.demonstrations(4 * n, rng)
    if gold:
        pool = sorted(pool, key=lambda d: -task.gold_score(*d))  # stable: equal scores keep their drawn order
    return pool[:n]


def copied_example_share(chains, constitution) -> float:
    """The share of chains whose final revision is one of the constitution's example revisions, word for word
    (whitespace aside): a policy too small to revise its own reply copies the few-shot turns instead (measured with
    SmolLM2-135M-Instruct: docs/cai.md)."""
    examples = {" ".join(e.revision.split()) for e in constitution.examples}
    return sum(" ".join(str(c.revision).split()) in examples for c in chains) / max(len(chains), 1)


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): chains and fine-tuning from OUT's SFT policy."""
    start, sc = time.time(), cfg.sl_cai
    sft_dir = out / "sft" / "model"
    constitution = load_constitution(sc.constitution or DEFAULT_CONSTITUTION)
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    policy, _ = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed, frozen_copy=False)

    # 1. Red-team prompts and helpful demonstrations.
    rng = random.Random(f"{cfg.seed}-sl_cai")
    prompts = task.prompts(sc.n_prompts, rng)
    helpful = helpful_demonstrations(task, sc.n_helpful, rng, gold=cfg.task != "none")

    # 2. The chains, kept for the report.
    policy.eval()
    chains = critique_revision_chains(policy, tokenizer, prompts, constitution, rounds=sc.rounds, seed=cfg.seed,
                                      temperature=sc.temperature, few_shot=sc.few_shot, dtype=rt.dtype,
                                      max_new_tokens=sc.max_new_tokens or 2 * task.max_new_tokens,
                                      desc="sl_cai: critique -> revision")
    write_chains(stage_dir / "chains.jsonl", chains)

    # 3. Fine-tune on the final revisions plus the helpful demonstrations.
    revisions = [(c.prompt, c.revision) for c in chains]
    pairs = revisions + [(p, d) for p, d in helpful]
    probe = encode_pairs(tokenizer, [p for p, _ in revisions], [r for _, r in revisions])
    before = evaluate_nll(policy, probe, sc.batch_size, rt)
    log = MetricsLog(stage_dir / "metrics.jsonl")
    fit = fine_tune(policy, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], epochs=sc.epochs,
                    batch_size=sc.batch_size, lr=sc.lr, seed=random.Random(f"{cfg.seed}-sl_cai-fit").getrandbits(62),
                    rt=rt, log=log, desc="sl_cai: fine-tuning", alone=True)  # a main-process stage
    log.close()
    after = evaluate_nll(policy, probe, sc.batch_size, rt)

    # 4. The SL-CAI policy and its figures.
    policy.save_pretrained(stage_dir / "model")
    tokenizer.save_pretrained(stage_dir / "model")
    result = {
        "n_chains": len(chains),
        "n_helpful": len(helpful),
        "revised_share": sum(c.revision != c.response for c in chains) / max(len(chains), 1),
        # a small model may copy a few-shot example's revision word for word instead of revising its own reply
        "copied_example_share": copied_example_share(chains, constitution) if sc.few_shot else 0.0,
        "revision_nll_before": before,
        "revision_nll_after": after,
        "response_words": sum(len(str(c.response).split()) for c in chains) / max(len(chains), 1),
        "revision_words": sum(len(str(c.revision).split()) for c in chains) / max(len(chains), 1),
        "steps": fit["steps"],
        "passes": fit["backward"],
        "constitution": constitution.source,
        "wall_time_s": time.time() - start,
    }
    write_json(stage_dir / "summary.json", result)
    return result
