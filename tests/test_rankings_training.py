"""Listwise and graded preferences end to end: rankings as tensors (grouping, identical texts, one forward per
item), the Plackett-Luce reward model and DPO over rankings against per-row oracles and on an easy problem,
strength labels from simulated labelers through the comparisons' margins into the reward model's loss, bad
rankings files, and the stages' recorded inputs."""

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_dpo import oracle_sequence_logprob

from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.dpo import listwise_batch_loss, train_dpo
from rlhfkit.algorithms.reward import ranking_scores
from rlhfkit.core.errors import DataError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.batching import encode_completion, encode_prompt
from rlhfkit.data.contract import STRENGTH_MARGINS, RankingRecord, read_comparisons, read_rankings, write_jsonl
from rlhfkit.data.preferences import load_comparisons, load_rankings
from rlhfkit.data.ranked import encode_ranked_items, group_rankings, to_grid
from rlhfkit.feedback.simulated import consensus_comparisons, simulated_ranking, strength_label
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_scalar_model
from rlhfkit.models.reference import Reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import RANKING_LOSSES
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import run_stage, stage_changes

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), None)


def pl_oracle(values: list[float], ranking: list[list[int]]) -> float:
    """Plackett-Luce negative log-likelihood of one ranking by the documented tie rule, as a plain loop: each
    completion is chosen from itself and every completion in a strictly lower tie group."""
    nll = 0.0
    for g, group in enumerate(ranking):
        below = [j for later in ranking[g + 1 :] for j in later]
        for i in group:
            nll -= values[i] - math.log(sum(math.exp(values[j]) for j in [i, *below]))
    return nll


def _tokenizer(path):
    """The tokenizer saved in a model directory."""
    from rlhfkit.models.load import load_tokenizer

    return load_tokenizer(path, "test")


# ---------------------------------------------------------------- rankings as tensors

def test_group_rankings_merges_identical_texts_and_drops_rankings_without_a_preference():
    recs = [RankingRecord("a", "p", ["x", "y", "x", "z"], "u1", [[2], [1], [0, 3]]),
            RankingRecord("a", "p", ["x", "y", "x", "z"], "u2", [[0, 1, 2, 3]]),  # all tied: no preference
            RankingRecord("a", "p", ["x", "y", "x", "z"], "u3", [[3], [0, 1, 2]]),
            RankingRecord("b", "q", ["s", "s"], "u1", [[0], [1]])]  # the same text twice: one alternative
    a, b = group_rankings(recs)
    assert a.completions == ["x", "y", "z"]  # the first copy of "x" stands for both, where it was ranked
    assert a.rankings == [[[1], [0, 2]], [[2], [0, 1]]]
    assert (b.item_id, b.completions, b.rankings) == ("b", ["s"], [])  # kept: a comparison may name its text


def ragged_items(n: int = 9, seed: int = 0):
    """Items of 2 to 4 distinct digit completions, 1 to 3 rankings each (ties included)."""
    from rlhfkit.tasks import get_task

    rng = random.Random(seed)
    demos = get_task("digits").demonstrations(4 * n, rng)
    records = []
    for i in range(n):
        prompt = demos[4 * i][0]
        completions = list(dict.fromkeys(c for _, c in demos[4 * i : 4 * i + rng.randint(2, 4)]))
        if len(completions) < 2:
            completions.append("1 2 3")
        for u in range(rng.randint(1, 3)):
            perceived = [rng.randint(0, 2) for _ in completions]
            perceived[rng.randrange(len(perceived))] = 3  # never all tied
            order: dict[int, list[int]] = {}
            for j, s in enumerate(perceived):
                order.setdefault(s, []).append(j)
            ranking = [order[s] for s in sorted(order, reverse=True)]
            records.append(RankingRecord(f"i{i}", prompt, completions, f"u{u}", ranking))
    return records


def test_batch_puts_each_completion_under_its_ranking(tokenizer):
    """The (R, K) grid of a batch of items, from per-row values, against a loop over the items' rankings: fails
    on a ranking matched to the wrong item, a shifted row, or padding in the wrong place."""
    items = group_rankings(ragged_items())
    data = encode_ranked_items(tokenizer, items)
    batch = torch.tensor([5, 0, 7, 2])
    rows, present, ranks, owner = data.batch(batch)
    grid = to_grid(rows.float() + 1, present)[owner]  # value = row + 1, so 0 marks padding
    expected_grid, expected_ranks = [], []
    for b in batch.tolist():
        it = items[b]
        for ranking in it.rankings:
            k = data.rows.shape[1]
            values = [data.row_of[(it.item_id, c)] + 1.0 for c in it.completions]
            expected_grid.append(values + [0.0] * (k - len(values)))
            position = {i: g for g, group in enumerate(ranking) for i in group}
            expected_ranks.append([position.get(j, -1) for j in range(k)])
    assert grid.tolist() == expected_grid and ranks.tolist() == expected_ranks
    ids = data.seqs[0]
    for it in items:  # each row holds its item's prompt and completion
        for c in it.completions:
            row = ids[data.row_of[(it.item_id, c)]].tolist()
            seq = encode_prompt(tokenizer, it.prompt) + encode_completion(tokenizer, c)
            assert row[: len(seq)] == seq
    # a batch of about b rankings is whole items: b * items / rankings of them
    n_rankings = sum(len(it.rankings) for it in items)
    assert data.items_per_batch(6) == max(1, round(6 * len(items) / n_rankings))


# ---------------------------------------------------------------- the Plackett-Luce reward model, by value

@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("policy")
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
    with torch.no_grad():  # sharp weights: a shifted token or row changes a score by far more than rounding
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_ranking_loss_matches_per_row_oracle(tokenizer, policy_dir):
    torch.manual_seed(0)
    model = load_scalar_model(policy_dir, CPU.device, "reward model").eval()
    items = group_rankings(ragged_items())
    data = encode_ranked_items(tokenizer, items)
    batch = torch.tensor([3, 8, 1, 4])
    with torch.no_grad():
        loss, stats = RANKING_LOSSES["plackett_luce"](*ranking_scores(model, data, batch, CPU))
        terms, correct, pairs = [], 0, 0
        for b in batch.tolist():
            it = items[b]
            scores = [sequence_scores(model, torch.tensor([encode_prompt(tokenizer, it.prompt) +
                                                           encode_completion(tokenizer, c)]),
                                      torch.ones(1, len(encode_prompt(tokenizer, it.prompt)) +
                                                 len(encode_completion(tokenizer, c)), dtype=torch.long)).item()
                      for c in it.completions]  # one unpadded row each
            for ranking in it.rankings:
                terms.append(pl_oracle(scores, ranking))
                for g, group in enumerate(ranking):
                    for i in group:
                        for j in (j for later in ranking[g + 1 :] for j in later):
                            correct, pairs = correct + (scores[i] > scores[j]), pairs + 1
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)
    assert stats["accuracy"].item() == pytest.approx(correct / pairs)


# ---------------------------------------------------------------- DPO over rankings, by value

@pytest.mark.parametrize("reference_kind", ["online", "cached"])
def test_listwise_dpo_loss_matches_per_row_oracle(reference_kind, tokenizer, sharp_policy):
    """At a moved policy: the trainer's listwise loss from per-row oracle log-probs; at policy = reference, the
    closed form mean over rankings of sum_i log |choice set of i|."""
    items = group_rankings(ragged_items())
    data = encode_ranked_items(tokenizer, items)
    reference_model = sharp_policy("llama", seed=1)
    policy = sharp_policy("llama", seed=1)
    reference = Reference(model=reference_model)
    if reference_kind == "cached":
        batches = torch.arange(len(data.seqs[0])).split(5)
        reference = Reference(table={"train": reference.table_of(data.seqs, batches, CPU)})
    dc = load_config(dpo={"loss": "plackett_luce", "beta": 0.3}).dpo
    batch = torch.tensor([6, 2, 0, 8])
    loss, _ = listwise_batch_loss(policy, data, batch, reference, "train", dc, CPU)
    rankings = [r for b in batch.tolist() for r in items[b].rankings]
    log_orders = [sum(math.log(1 + sum(len(h) for h in r[g + 1 :])) for g, group in enumerate(r) for _ in group)
                  for r in rankings]
    assert loss.item() == pytest.approx(sum(log_orders) / len(log_orders), abs=1e-5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    loss, stats = listwise_batch_loss(policy, data, batch, reference, "train", dc, CPU)
    terms = []
    for b in batch.tolist():
        it = items[b]
        rewards = []
        for c in it.completions:
            p, q = encode_prompt(tokenizer, it.prompt), encode_completion(tokenizer, c)
            log_ratio = oracle_sequence_logprob(policy, p, q) - oracle_sequence_logprob(reference_model, p, q)
            rewards.append(0.3 * log_ratio)
        terms += [pl_oracle(rewards, r) for r in it.rankings]
    assert min(abs(t) for t in terms) > 0.01
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)
    assert set(stats) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                          "logps/chosen", "logps/rejected"}


# ---------------------------------------------------------------- training on an easy problem

def easy_rankings(n: int, seed: int = 0) -> list[RankingRecord]:
    """A rule-following completion, it cut to three digits and to two, shuffled: u1 ranks them in that order,
    u2 ties the two cut ones (so the majority consensus holds full > cut pairs only)."""
    from rlhfkit.tasks import get_task

    rng = random.Random(seed)
    records = []
    for i, (prompt, c) in enumerate(get_task("digits").demonstrations(n, rng)):
        texts = [c, c.rsplit(" ", 1)[0], c.rsplit(" ", 2)[0]]
        order = rng.sample(range(3), 3)  # completions[j] = texts[order[j]]
        at = {t: j for j, t in enumerate(order)}
        completions = [texts[t] for t in order]
        records += [RankingRecord(f"easy-{i:03d}", prompt, completions, "u1", [[at[0]], [at[1]], [at[2]]]),
                    RankingRecord(f"easy-{i:03d}", prompt, completions, "u2", [[at[0]], sorted([at[1], at[2]])])]
    return records


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    write_jsonl(root / "rankings.jsonl", easy_rankings(80))
    return root


def test_plackett_luce_reward_model_learns_and_is_measured_on_comparisons(easy, policy_dir, tmp_path):
    cfg = load_config(device="cpu", threads=1, reward={
        "data": str(easy / "rankings.jsonl"), "init": str(policy_dir), "loss": "plackett_luce", "epochs": 4,
        "batch_size": 8, "heldout_fraction": 0.25, "lr": 3e-3})
    result = run_stage("reward", cfg, tmp_path / "out")
    assert result["loss"] == "plackett_luce" and result["data"] == str(easy / "rankings.jsonl")
    # held-out comparisons: the majority consensus of the held-out items, full > each cut one
    _, test = load_rankings(easy / "rankings.jsonl", None, "", 0.25, 0, _tokenizer(policy_dir))
    assert result["n_heldout"] == len(test.comparisons) == 2 * len(test.items)
    assert all(len(c.chosen) > len(c.rejected) for c in test.comparisons)
    assert result["n_train_rankings"] == 2 * result["n_train_items"] and result["n_train_items"] + len(test.items) == 80
    assert result["steps"] == 4 * (result["n_train_items"] // 4)  # 8 rankings a batch = 4 items
    assert result["heldout_accuracy"] >= 0.9 and result["heldout_loss"] < math.log(2)
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(tmp_path / "out" / "reward" / "metrics.jsonl") for k in rec}
    assert {"loss/reward", "reward/accuracy"} <= logged <= glossary


def test_listwise_dpo_learns_with_the_cache_and_online_alike(easy, tokenizer, tmp_path):
    sft = tmp_path / "sft"
    build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    settings = dict(loss="plackett_luce", epochs=3, batch_size=8, lr=3e-3, beta=0.1, heldout_fraction=0.25)
    results = {}
    for kind in ("cached", "online"):
        cfg = load_config(threads=1, dpo={**settings, "reference": kind})
        results[kind] = train_dpo(cfg, None, sft, tmp_path / kind, CPU, rankings_path=easy / "rankings.jsonl")
    cached, online = results["cached"], results["online"]
    train_items = cached["n_train_items"]
    # step 0: policy = reference, every implicit reward 0: u1's strict ranking log 3! , u2's [[a], [b, c]] log 3
    assert cached["initial_loss"] == pytest.approx((math.log(6) + math.log(3)) / 2, abs=1e-5)
    assert cached["n_train_rankings"] == 2 * train_items and cached["n_heldout_rankings"] == 2 * (80 - train_items)
    assert cached["reference_cache_sequences"] == 3 * 80  # one pass over every completion, train and held out
    assert cached["reference_forwards_per_epoch"] == [0, 0, 0] and online["reference_forwards_per_epoch"][0] > 0
    for key in ("heldout_accuracy", "heldout_loss", "heldout_reward_margin", "heldout_logps_chosen"):
        assert cached[key] == pytest.approx(online[key], abs=1e-5)
    # the outcome: held-out full completions above the cut ones, probability moved towards them
    assert cached["heldout_accuracy"] >= 0.9 and cached["heldout_reward_margin"] > 0.1
    moved = cached["heldout_logps_chosen"] - cached["heldout_logps_rejected"]
    assert moved > cached["heldout_ref_logps_chosen"] - cached["heldout_ref_logps_rejected"] + 1.0
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(tmp_path / "cached" / "metrics.jsonl") for k in rec}
    assert {"loss/dpo", "rewards/margins", "rewards/accuracies"} <= logged <= glossary


# ---------------------------------------------------------------- bad input, before anything runs

def test_wrong_kind_of_file_and_bad_rankings_name_what_to_change(easy, tmp_path, policy_dir, tokenizer):
    comparisons = tmp_path / "c.jsonl"
    write_jsonl(comparisons, [c for recs in [easy_rankings(4)] for c in consensus_comparisons(
        recs[0].item_id, recs[0].prompt, recs[0].completions, [r.ranking for r in recs[:2]], ["u1", "u2"], "majority")])
    with pytest.raises(DataError, match=r"c.jsonl: holds pairs \(format 'comparisons', told from .*c.jsonl:1.*\), but reward.loss = "
                                        r"'plackett_luce' trains on whole rankings"):
        load_rankings(comparisons, None, "", 0.25, 0, tokenizer)
    # the other way round works: a pairwise loss reads a rankings file's pairs (the labeling app's majority rule)
    train, test = load_comparisons(easy / "rankings.jsonl", "", 0.25, 0, tokenizer, stage="dpo")
    assert train and test and all(c.chosen != c.rejected for c in train + test)
    lines = (easy / "rankings.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["ranking"] = [[0], [0, 1]]
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    out = tmp_path / "out"
    cfg = load_config(device="cpu", reward={"data": str(tmp_path / "bad.jsonl"), "init": str(policy_dir),
                                            "loss": "plackett_luce"})
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'ranking': \[0, 0, 1\] is not a permutation of 0..2"):
        run_stage("reward", cfg, out)
    assert not (out / "reward").exists() and not (out / ".partial").exists()


# ---------------------------------------------------------------- strengths, from labelers to the loss

def test_strength_labels_from_the_perceived_gap():
    assert [strength_label(g) for g in (3.0, 1.0, 1 - 1e-12, 2 / 3, 0.5, 1 / 3, 0.2)] == [
        "significantly", "significantly", "significantly", "better", "slightly", "slightly", "negligibly"]
    gold = [1.0, 2 / 3, 2.0, 2 / 3, -1.0]
    a, b = random.Random(3), random.Random(3)
    for _ in range(50):  # strengths draw no random number: the same rankings with or without them
        (ranking, strengths), (plain, none) = simulated_ranking(gold, 0.3, a, True), simulated_ranking(gold, 0.3, b)
        assert ranking == plain and none is None and len(strengths) == len(ranking) - 1


def test_consensus_margin_is_the_mean_over_supporters_of_the_strongest_step():
    rankings = [[[0], [1], [2]], [[0], [1, 2]], [[0, 1], [2]]]
    strengths = [["slightly", "better"], ["significantly"], None]  # the third labeler gave none
    table = dict(zip(STRENGTH_MARGINS, [3.0, 2.0, 1.0, 0.0]))
    got = {(c.chosen, c.rejected): c.margin for c in consensus_comparisons(
        "i", "p", ["a", "b", "c"], rankings, ["u1", "u2", "u3"], "majority", strengths, table)}
    # a > c: u1's strongest step between them is "better"; b > c: u1 and u3 (who gave no strengths) support it
    assert got == {("a", "b"): (1.0 + 3.0) / 2, ("a", "c"): (2.0 + 3.0) / 2, ("b", "c"): 2.0}
    plain = consensus_comparisons("i", "p", ["a", "b", "c"], rankings, ["u1", "u2", "u3"], "majority")
    assert [c.margin for c in plain] == [None, None, None]


MICRO = ["sft.n_demos=640", "sft.epochs=1", "feedback.n_prompts=120", "reward.epochs=1", "reward.batch_size=16",
         "device='cpu'", "threads=1"]


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "out"
    run_stage("sft", load_config(overrides=MICRO), out)
    return out


def test_strengths_flow_from_labelers_to_the_reward_loss(sft_out, tmp_path, monkeypatch):
    """feedback.strengths: the rankings carry strengths, each comparison's margin follows from them and
    feedback.strength_margins (here Llama 2's large-margin table), and the reward model's Bradley-Terry loss
    receives exactly those margins (none with reward.use_margin = false); the rankings are those of a run
    without strengths, whose comparisons carry no margin (the default)."""
    plain, graded = tmp_path / "plain", tmp_path / "graded"
    for out in (plain, graded):
        shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=MICRO), plain)
    assert all(c.margin is None for c in read_comparisons(plain / "feedback" / "comparisons.jsonl"))
    graded_cfg = load_config(overrides=MICRO + ["feedback.strengths=true", "feedback.strength_margins=[3, 2, 1, 0]"])
    run_stage("feedback", graded_cfg, graded)
    rankings = read_rankings(graded / "feedback" / "rankings.jsonl")
    assert [(r.ranking, r.completions) for r in rankings] == [
        (r.ranking, r.completions) for r in read_rankings(plain / "feedback" / "rankings.jsonl")]
    assert all(len(r.strengths) == len(r.ranking) - 1 for r in rankings)
    comparisons = read_comparisons(graded / "feedback" / "comparisons.jsonl")
    by_item: dict[str, list] = {}
    for r in rankings:
        by_item.setdefault(r.item_id, []).append(r)
    table = dict(zip(STRENGTH_MARGINS, [3.0, 2.0, 1.0, 0.0]))
    expected = [c.margin for recs in by_item.values() for c in consensus_comparisons(
        recs[0].item_id, recs[0].prompt, recs[0].completions, [r.ranking for r in recs], [r.labeler_id for r in recs],
        "majority", [r.strengths for r in recs], table)]
    assert [c.margin for c in comparisons] == expected and max(expected) >= 2.0

    seen = []
    real_loss = reward_module.bradley_terry_loss

    def spy(chosen, rejected, margin=None, target=None):
        if margin is not None:  # training steps (the evaluation passes none)
            seen.append(margin.detach().clone())
        return real_loss(chosen, rejected, margin, target)

    monkeypatch.setattr(reward_module, "bradley_terry_loss", spy)
    for use_margin in (True, False):
        seen.clear()
        overrides = ["feedback.strengths=true", "feedback.strength_margins=[3, 2, 1, 0]",
                     f"reward.use_margin={str(use_margin).lower()}"]
        result = run_stage("reward", load_config(overrides=MICRO + overrides), graded)
        used = sorted(torch.cat(seen).tolist())
        train, _ = load_comparisons(graded / "feedback" / "comparisons.jsonl", "", 0.1, 0,
                                    _tokenizer(graded / "sft" / "model"))
        assert len(used) == result["steps"] * 16
        if use_margin:  # each step's margins are those of its comparisons: a sub-multiset of the training margins
            pool = torch.tensor([c.margin for c in train]).tolist()  # as float32, like the tensor the loss gets
            assert all(used.count(m) <= pool.count(m) for m in set(used)) and max(used) >= 2.0
        else:
            assert set(used) == {0.0}


def test_new_fields_keep_old_outputs_up_to_date_and_the_loss_is_an_input(sft_out, tmp_path):
    """Output directories made before reward.loss and feedback.strengths existed stay up to date (a missing
    recorded field reads as its default); choosing the Plackett-Luce loss redoes the reward model."""
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    cfg = load_config(overrides=MICRO)
    run_stage("feedback", cfg, out)
    run_stage("reward", cfg, out)
    for stage in ("feedback", "reward"):
        path = out / stage / "INPUTS.json"
        inputs = json.loads(path.read_text())
        for key in ("strengths", "strength_margins"):
            del inputs["feedback"][key]
        if "reward" in inputs:
            del inputs["reward"]["loss"]
        path.write_text(json.dumps(inputs))
        assert stage_changes(out, stage, cfg) == []
    listwise = load_config(overrides=MICRO + ["reward.loss='plackett_luce'"])
    assert stage_changes(out, "reward", listwise) == ["reward.loss: 'bradley_terry' -> 'plackett_luce'"]
    assert stage_changes(out, "feedback", listwise) == []
    result = run_stage("reward", listwise, out)
    assert result["loss"] == "plackett_luce" and result["data"] == "feedback/rankings.jsonl"
    # the same items held out: the Plackett-Luce model is measured on the Bradley-Terry model's held-out comparisons
    _, test = load_comparisons(out / "feedback" / "comparisons.jsonl", "", 0.1, 0, _tokenizer(out / "sft" / "model"))
    _, listwise_test = load_rankings(out / "feedback" / "rankings.jsonl", out / "feedback" / "comparisons.jsonl", "",
                                     0.1, 0, _tokenizer(out / "sft" / "model"))
    assert listwise_test.comparisons == test and {it.item_id for it in listwise_test.items} >= {c.item_id for c in test}
    assert result["n_heldout"] == len(test)
    listwise_dpo = load_config(overrides=MICRO + ["method='dpo'", "dpo.loss='plackett_luce'", "dpo.epochs=1"])
    dpo = run_stage("dpo", listwise_dpo, out)
    assert dpo["loss"] == "plackett_luce" and dpo["n_train_rankings"] > 0 and dpo["n_heldout"] == len(test)
