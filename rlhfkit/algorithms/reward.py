"""Reward model: a scalar head trained on comparisons (Bradley-Terry) or on whole rankings (Plackett-Luce).

    bradley_terry:  loss = -log sigma(r(x, y_chosen) - r(x, y_rejected) - m)   (InstructGPT eq. 1; Llama 2 eq. 2)
    plackett_luce:  loss = -sum_k [ r(x, y_tau(k)) - log sum_{j >= k} e^{r(x, y_tau(j))} ]   (Plackett 1975)

r is the head's output at the last real token of prompt + completion + EOS. `reward.loss` picks the loss:
Bradley-Terry on the comparisons, chosen and rejected in ONE forward pass (stacked on the batch axis), the
margin m from the labelers' strengths (`reward.use_margin`), the target an AI labeler's soft label where the
comparisons carry one (`reward.soft_labels`: cross-entropy, distilled RLAIF, docs/rlaif.md); or Plackett-Luce on the rankings
(rankings.jsonl), batched by item: an item's K completions in ONE forward, each labeler's ranking of it one
term (ties, identical texts, several labelers: rlhfkit/data/ranked.py and docs/methods/reward.md).
Both are measured the same way: pairwise accuracy on the consensus comparisons of held-out items (not pairs:
pairs of one item share a prompt), the items split by the same hash. One reward model learns one criterion
(`reward.criterion`): mixing, say, helpfulness and harmlessness labels would fit neither.
`reward.criterion = "*"` trains one model per criterion in the data, each in OUT/reward/<criterion>/.
An encoder `reward.init` (BERT, MiniLM, ...; rlhfkit.models.scoring.is_decoder_model) is trained and read the way it
reads text: its tokenizer's pair encoding of (prompt, completion), no EOS appended, its own forward (pooler
and classifier head), r = the one logit; same loss, same held-out accuracy (bradley_terry only).
Deviations from InstructGPT: comparisons of one item are not forced into one batch under bradley_terry (K is
small here); plackett_luce keeps an item's whole ranking in one term instead. Each epoch makes
len // batch_size steps on a fresh shuffle and drops the remainder (different comparisons each epoch).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from rlhfkit.core.config import CRITERION_NAME
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.core.runio import tracked
from rlhfkit.data.batching import used_columns
from rlhfkit.data.contract import Comparison
from rlhfkit.data.preferences import load_comparisons, load_rankings, read_preferences
from rlhfkit.data.ranked import RankedData, encode_ranked_items, to_grid
from rlhfkit.models.forward import disable_dropout, sequence_scores
from rlhfkit.models.load import load_scalar_model, load_tokenizer
from rlhfkit.models.engine import make_engine, my_share, save_pretrained, sum_over_processes
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.scoring import encode_for_scoring, is_decoder_model, sequence_rewards
from rlhfkit.ops.losses import RANKING_LOSSES, bradley_terry_loss
from rlhfkit.spine.epochs import Epochs, LoopOptions

GoldScore = Callable[[object, object, str], float]  # (prompt, completion, criterion) -> the task's gold score

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config


class EncodedComparisons(NamedTuple):
    inputs: dict[str, torch.Tensor]  # (2N, T) model inputs: chosen rows first, then rejected rows
    margins: torch.Tensor  # (N,) 0 where unknown
    decoder: bool  # read the decoder way (last token) or the native way (the model's own forward)
    targets: torch.Tensor  # (N,) P(chosen better): the soft label, 1 for a hard label


def encode_comparisons(tokenizer, comparisons: list[Comparison], decoder: bool = True) -> EncodedComparisons:
    """Chosen and rejected (prompt, completion) rows as the reward model reads them (rlhfkit.models.scoring), margins
    and targets (soft labels)."""
    prompts = [c.prompt for c in comparisons] * 2
    completions = [c.chosen for c in comparisons] + [c.rejected for c in comparisons]
    margins = torch.tensor([c.margin or 0.0 for c in comparisons], dtype=torch.float32)
    targets = torch.tensor([1.0 if c.soft_label is None else c.soft_label for c in comparisons], dtype=torch.float32)
    return EncodedComparisons(encode_for_scoring(tokenizer, prompts, completions, decoder), margins, decoder, targets)


def pair_scores(model, data: EncodedComparisons, idx, rt: Runtime):
    """Scores of chosen and rejected for comparisons `idx` (host indices of host data), in one forward pass."""
    rows = torch.cat([idx, idx + len(data.margins)])  # chosen rows, then their rejected rows
    mask = data.inputs.get("attention_mask")
    T = used_columns(mask[rows]) if mask is not None else None  # the batch's own longest row
    inputs = {k: rt.put(v[rows, :T]) for k, v in data.inputs.items()}
    with autocast(rt.device, rt.dtype):
        scores = sequence_rewards(model, inputs, data.decoder, rt)  # rt.padding_free: a decoder's rows packed
    return scores[: len(idx)], scores[len(idx) :]


def ranking_scores(model, data: RankedData, items: torch.Tensor, rt: Runtime):
    """(R, K) scores of every ranking of `items` and (R, K) their ranks: the items' completions in ONE forward."""
    rows, present, ranks, owner = data.batch(items)
    ids, mask, _ = data.seqs
    T = used_columns(mask[rows])  # the batch's own longest row
    with autocast(rt.device, rt.dtype):
        scores = sequence_scores(model, rt.put(ids[rows, :T]), rt.put(mask[rows, :T]), rt)  # (F,)
    return to_grid(scores, rt.put(present))[rt.put(owner)], rt.put(ranks)  # (R, K): an item's scores once per ranking of it


@torch.no_grad()
def evaluate_pairs(model, data: EncodedComparisons, rt: Runtime, batch_size: int,
                   desc: str = "reward model: evaluating") -> dict:
    """Accuracy and mean loss over `data`, `batch_size` comparisons a forward: the training batch, so that
    evaluating never needs more memory than a training step (at 512 pairs it tripled the peak; issue 18). Under
    several processes each forwards its share of the batches (call it on every process together)."""
    model.eval()
    n = len(data.margins)
    correct, loss_sum = 0.0, 0.0
    starts = range(0, n, batch_size)
    for b in tracked(my_share(len(starts)), desc):  # this process's batches; the sums added up over the processes
        idx = torch.arange(starts[b], min(starts[b] + batch_size, n))
        c, r = pair_scores(model, data, idx, rt)
        loss, stats = bradley_terry_loss(c, r)
        correct += stats["accuracy"].item() * len(idx)
        loss_sum += loss.item() * len(idx)
    sums = sum_over_processes({"correct": correct, "loss": loss_sum})
    return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}


def gold_ordered(comparisons: list[Comparison], gold: GoldScore) -> list[Comparison]:
    """The comparisons whose two replies the gold scorer tells apart, with `chosen` the gold-better one and hard
    labels: what heldout_gold_accuracy measures the reward model on, whoever labelled the data."""
    out = []
    for c in comparisons:
        a, b = gold(c.prompt, c.chosen, c.criterion), gold(c.prompt, c.rejected, c.criterion)
        if a != b:
            better, worse = (c.chosen, c.rejected) if a > b else (c.rejected, c.chosen)
            out.append(dataclasses.replace(c, chosen=better, rejected=worse, margin=None, soft_label=None))
    return out


def train_reward_model(cfg: Config, comparisons_path: Path | None, init_dir: Path, out_dir: Path, rt: Runtime,
                       rankings_path: Path | None = None, gold: GoldScore | None = None) -> dict:
    """Train on the comparisons (bradley_terry) or the rankings (plackett_luce; the comparisons, when given,
    measure it); save in out_dir/model. preference_files says which files a run reads. reward.criterion = '*':
    one model per criterion (train_per_criterion). `gold` (prompt, completion, criterion) -> score, the task's gold
    scorer where it has one, adds heldout_gold_accuracy: the held-out pairs ordered by the truth, not the labels
    (an AI labeler's reward model measured against the gold labels of the same items)."""
    if cfg.reward.criterion == "*":
        return train_per_criterion(cfg, comparisons_path, init_dir, out_dir, rt, rankings_path, gold)
    start = time.time()
    rc = cfg.reward
    listwise = rc.loss == "plackett_luce"

    # 1. Data: the one contract (rlhfkit.data.contract), one criterion, split by item; read by an encoder's own
    #    tokenizer and forward (rlhfkit.models.scoring), or a decoder's last token.
    decoder = is_decoder_model(init_dir)
    if listwise and not decoder:
        raise ConfigError(f"reward.loss = 'plackett_luce' reads whole rankings the decoder way, and reward.init = "
                          f"{str(init_dir)!r} is an encoder; use reward.loss = 'bradley_terry' with an encoder")
    tokenizer = load_tokenizer(init_dir, "reward.init", require_eos=decoder)
    if listwise:
        train_split, test_split = load_rankings(rankings_path, comparisons_path, rc.criterion, rc.heldout_fraction,
                                                cfg.seed, tokenizer)
        train, test = train_split.comparisons, test_split.comparisons
        ranked = encode_ranked_items(tokenizer, [it for it in train_split.items if it.rankings])
    else:
        train, test = load_comparisons(comparisons_path, rc.criterion, rc.heldout_fraction, cfg.seed, tokenizer)
    own_test = test  # the main data's held-out pairs (gold accuracy is theirs)
    if rc.mix_data:  # a second file in the same model (RL-CAI: AI harmlessness + human helpfulness labels)
        mix_train, mix_test = load_comparisons(rc.mix_data, rc.mix_criterion, rc.heldout_fraction, cfg.seed, tokenizer)
        train, test = train + mix_train, test + mix_test

    # 2. Model: the initial backbone (the SFT policy by default) with a fresh scalar head.
    torch.manual_seed(cfg.seed)  # the new head's init
    # Dropout off, as TRL's RewardTrainer does by default (RewardConfig.disable_dropout): the loss is a difference
    # of two forwards' scores, which independent dropout masks only add noise to; on GPT-2 (dropout 0.1) it also
    # cost ~10% of a step (benchmarks/vs_trl.py). The built-in tiny models have none.
    model = disable_dropout(load_scalar_model(init_dir, rt.device, "reward.init"))
    train_data = encode_comparisons(tokenizer, train, decoder)  # host memory: each batch moved (Runtime.put)
    test_data = encode_comparisons(tokenizer, test, decoder)
    if not rc.use_margin:
        train_data.margins.zero_()
    soft = rc.soft_labels and not listwise and bool((train_data.targets < 1.0).any())  # distilled RLAIF

    # 3. Train: a batch is comparisons (bradley_terry: chosen + rejected in one forward) or items (plackett_luce:
    #    an item's K completions in one forward, each of its rankings one term).
    def batch_loss(idx: torch.Tensor):
        if listwise:
            return RANKING_LOSSES["plackett_luce"](*ranking_scores(model, ranked, idx, rt))
        chosen, rejected = pair_scores(model, train_data, idx, rt)
        return bradley_terry_loss(chosen, rejected, rt.put(train_data.margins[idx]),
                                  rt.put(train_data.targets[idx]) if soft else None)

    n = len(ranked.rows) if listwise else len(train)  # items or comparisons
    batch_size = ranked.items_per_batch(rc.batch_size) if listwise else rc.batch_size  # ~batch_size rankings
    optimizer, scheduler = make_optimizer(model.parameters(), rc.lr, Epochs.count(n, batch_size, rc.epochs))
    engine = make_engine({"reward": model}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         checkpointing=rt.checkpointing, sharding=rt.sharding)
    engine.check_batch(min(batch_size, n), "reward.batch_size")
    # a listwise loss is a mean over rankings: a micro-batch of items weighs by its rankings
    units = (lambda items: (ranked.ranks[items] >= 0).any(-1).sum()) if listwise else None  # noqa: E731
    loop = Epochs(engine, n=n, batch_size=batch_size, epochs=rc.epochs, generator=torch.Generator().manual_seed(cfg.seed),
                  desc="reward model", log=out_dir / "metrics.jsonl",
                  options=LoopOptions.of(cfg.train), checkpoint=out_dir, eval_loss="loss/reward",
                  evaluate=lambda: {f"{k}/reward" if k == "loss" else f"reward/{k}": v for k, v in
                                    evaluate_pairs(model, test_data, rt, rc.batch_size, "reward model: evaluating").items()})
    model.train()
    for idx in loop:
        out = engine.step(idx, batch_loss, units)
        loop.done(out, {"loss/reward": out["loss"], "reward/accuracy": out["accuracy"]})
    total_steps = loop.finish()["steps"]

    # 4. Held-out accuracy on comparisons, whichever the loss; save with save_pretrained.
    heldout = evaluate_pairs(model, test_data, rt, rc.batch_size, desc="reward model: held-out accuracy")

    def accuracy_on(comparisons: list[Comparison], desc: str) -> float:
        return evaluate_pairs(model, encode_comparisons(tokenizer, comparisons, decoder), rt,
                              rc.batch_size, desc)["accuracy"]

    mix_figures = {"mix_data": rc.mix_data, "n_train_mix": len(mix_train), "n_heldout_mix": len(mix_test),
                   "heldout_accuracy_own": accuracy_on(own_test, "reward model: held-out accuracy (own data)"),
                   "heldout_accuracy_mix": accuracy_on(mix_test, "reward model: held-out accuracy (mix_data)"),
                   } if rc.mix_data else {}
    gold_test = gold_ordered(own_test, gold) if gold is not None else []
    gold_figures = {"heldout_gold_accuracy": accuracy_on(gold_test, "reward model: held-out gold accuracy"),
                    "n_heldout_gold": len(gold_test)} if gold_test else {}
    train_eval = evaluate_pairs(model, train_data, rt, rc.batch_size, desc="reward model: training accuracy")
    save_pretrained(model, tokenizer, out_dir / "model")
    listwise_figures = ({"n_train_items": len(ranked.rows), "n_train_rankings": int((ranked.ranks >= 0).any(-1).sum())}
                        if listwise else {})
    return {
        "criterion": train[0].criterion,
        "loss": rc.loss,
        # what it was trained on, for the report
        "data": cfg.reward.data or f"feedback/{'rankings' if listwise else 'comparisons'}.jsonl",
        **listwise_figures,
        "heldout_accuracy": heldout["accuracy"],
        "heldout_loss": heldout["loss"],
        **gold_figures,
        **mix_figures,
        "soft_labels": soft,
        "train_accuracy": train_eval["accuracy"],
        "n_train": len(train),
        "n_heldout": len(test),
        "steps": total_steps,
        "wall_time_s": time.time() - start,
    }


def train_per_criterion(cfg: Config, comparisons_path: Path | None, init_dir: Path, out_dir: Path, rt: Runtime,
                        rankings_path: Path | None = None, gold: GoldScore | None = None) -> dict:
    """reward.criterion = '*': one reward model per criterion of the data (Llama 2 trained one for helpfulness
    and one for safety), each trained alone as train_reward_model trains one, into out_dir/<criterion>/. When
    reward.sources read this run's reward models, only the criteria they name are trained (the courtesy task's
    'overall' comparisons feed DPO, not a reward model). The result holds each one's figures under 'criteria',
    and its held-out accuracy as heldout_accuracy/<criterion>."""
    start = time.time()
    source = rankings_path if cfg.reward.loss == "plackett_luce" else comparisons_path
    records = read_preferences(source, "rankings" if cfg.reward.loss == "plackett_luce" else "pairs", "reward")
    criteria = list(Counter(r.criterion for r in records))
    if not criteria:
        raise DataError(f"{source}: no comparisons to train on")
    read = [s.criterion for s in cfg.reward.sources if s.kind == "reward_model" and not s.path]
    if read:  # the reward models the sources read (Config.validate: each names a criterion under '*')
        missing = [c for c in read if c not in criteria]
        if missing:
            raise DataError(f"{source}: reward.sources read reward models of {', '.join(map(repr, missing))}, but the "
                            f"comparisons hold only {', '.join(map(repr, criteria))}; label those criteria "
                            "(feedback.criteria) or read another source")
        criteria = [c for c in criteria if c in read]
    for c in criteria:  # each names a directory
        if not CRITERION_NAME.fullmatch(c) or c == "model":
            raise DataError(f"{source}: criterion {c!r} cannot name a directory (OUT/reward/<criterion>/model); with "
                            "reward.criterion = '*' criteria must be up to 32 lowercase letters, digits, '-' or '_', "
                            "starting with a letter (and not 'model')")
    results = {}
    for c in criteria:
        one = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, criterion=c))
        (out_dir / c).mkdir(parents=True, exist_ok=True)
        results[c] = train_reward_model(one, comparisons_path, init_dir, out_dir / c, rt, rankings_path, gold)
    return {
        "criteria": results,
        **{f"heldout_accuracy/{c}": r["heldout_accuracy"] for c, r in results.items()},
        "loss": cfg.reward.loss,
        "data": results[criteria[0]]["data"],
        "wall_time_s": time.time() - start,
    }
