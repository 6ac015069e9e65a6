"""DPO: sequence log-probs against a per-row oracle, the trainer's loss path by value (ln 2 at policy = reference,
every DPO_LOSSES entry at a moved policy), the cached reference against the online one (same numbers, no
reference forward during training, reused by a rerun), an outcome on an easy problem, and documented metrics."""

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.algorithms.dpo import CACHE_FILE, dpo_batch_loss, encode_dpo_pairs, pair_batches, ref_pair_logps, train_dpo
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.batching import encode_completion, encode_pairs, encode_prompt, pad_right
from rlhfkit.data.contract import Comparison
from rlhfkit.models.forward import disable_dropout, freeze, sequence_logprobs
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.reference import Reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import DPO_LOSSES, LISTWISE_DPO_LOSSES
from rlhfkit.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), None)
ARCHS = ["gpt2", "llama"]


@torch.no_grad()
def oracle_sequence_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """sum_t log softmax(logits)[t - 1, token t] over the completion, from one unpadded row (no mask)."""
    ids = prompt + completion
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)  # (n, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


# ---------------------------------------------------------------- sequence_logprobs

# Ragged rows (prompt lengths 6, 1, 3, 2; completion lengths 4, 1, 6, 2): right padding of 0 to 5 tokens.
PROMPTS = [[1, 5, 6, 7, 8, 4], [1], [1, 9, 4], [1, 13]]
COMPLETIONS = [[6, 7, 8, 2], [2], [13, 5, 10, 5, 6, 2], [7, 2]]


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_logprobs_match_per_row_oracle(arch, tokenizer, sharp_policy):
    model = sharp_policy(arch)
    ids, mask = pad_right([p + c for p, c in zip(PROMPTS, COMPLETIONS)], tokenizer.pad_token_id)
    completion_mask, _ = pad_right([[0] * len(p) + [1] * len(c) for p, c in zip(PROMPTS, COMPLETIONS)], 0)
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask, completion_mask)
    expected = torch.tensor([oracle_sequence_logprob(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert got.shape == (len(PROMPTS),)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got, expected)
    # the layout encode_pairs makes from text is the same thing
    ids, mask, completion_mask = encode_pairs(tokenizer, ["4 5 9 1 =", "0 0 ="], ["6 2 7 8", "1"])
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask, completion_mask)
    expected = [oracle_sequence_logprob(model, [1, 9, 10, 14, 6, 4], [11, 7, 12, 13, 2]),
                oracle_sequence_logprob(model, [1, 5, 5, 4], [6, 2])]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-4, rtol=0)


def test_sequence_logprobs_refuses_a_completion_without_prefix(tokenizer, sharp_policy):
    model = sharp_policy("gpt2")
    ids, mask = pad_right([[5, 6, 2]], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="no prefix predicts"):
        sequence_logprobs(model, ids, mask, torch.ones_like(mask))


# ---------------------------------------------------------------- the trainer's loss path, by value

def easy_comparisons(n: int, seed: int = 0) -> list[Comparison]:
    """chosen = a rule-following completion (the task's demonstration); rejected = the same cut to three
    digits (malformed: a well-formed completion has four). Each comparison is its own item."""
    from rlhfkit.tasks import get_task

    demos = get_task("digits").demonstrations(n, random.Random(seed))
    return [Comparison(f"easy-{i:03d}", p, c, c.rsplit(" ", 1)[0]) for i, (p, c) in enumerate(demos)]


def dpo_section(**kw):
    return load_config(dpo=kw).dpo


@pytest.fixture(scope="module")
def batch(tokenizer, sharp_policy):
    """A batch of 8 comparisons (ragged: rejected rows are one token shorter), a moved policy and its reference."""
    data = encode_dpo_pairs(tokenizer, easy_comparisons(8))
    reference = sharp_policy("gpt2", seed=1)
    policy = sharp_policy("gpt2", seed=1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return data, policy, reference


@pytest.mark.parametrize("reference_kind", ["online", "cached"])
def test_loss_at_policy_equal_reference_is_ln2(reference_kind, tokenizer, sharp_policy):
    """Step 0 of a run: the policy is the SFT model, the reference its frozen copy or its cached log-probs."""
    data = encode_dpo_pairs(tokenizer, easy_comparisons(12))
    policy = disable_dropout(sharp_policy("llama"))
    frozen = freeze(disable_dropout(sharp_policy("llama")))
    reference = Reference(model=frozen)
    if reference_kind == "cached":
        reference = Reference(table={"train": reference.table_of(data, pair_batches(data, 5), CPU)})  # other batches
    idx = torch.tensor([3, 0, 7, 11, 5, 2, 9, 1])
    ref_chosen, ref_rejected = ref_pair_logps(reference, "train", data, idx, CPU)
    loss, stats = dpo_batch_loss(policy, data, idx, ref_chosen, ref_rejected, dpo_section(), CPU)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    if reference_kind == "online":  # the same forward twice: bit for bit
        assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
        assert stats["rewards/chosen"].item() == 0.0 and stats["rewards/accuracies"].item() == 0.0


def expected_loss(name, h, beta, eps):
    """The papers' equations on h = log-ratio(chosen) - log-ratio(rejected) (rlhfkit/ops/losses.py cites them)."""
    if name == "sigmoid":
        return -F.logsigmoid(beta * h).mean()
    if name == "conservative":
        return (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    if name == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    if name == "hinge":
        return torch.relu(1 - beta * h).mean()
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(DPO_LOSSES))  # the listwise loss: tests/test_rankings_training.py
def test_batch_loss_matches_per_row_oracle(name, batch, tokenizer):
    """At a moved policy, the trainer's loss and stats from per-row oracle log-probs: fails on a swapped policy
    and reference, chosen and rejected swapped in the stacking, a dropped beta or label_smoothing."""
    data, policy, reference = batch
    comparisons = easy_comparisons(8)
    beta, eps = 0.3, (0.2 if name == "conservative" else 0.0)
    dc = dpo_section(loss=name, beta=beta, label_smoothing=eps)
    idx = torch.tensor([6, 1, 4, 0, 3])

    def oracle(model, side):  # (b,) from unpadded rows
        return torch.tensor([oracle_sequence_logprob(model, encode_prompt(tokenizer, comparisons[i].prompt),
                                                     encode_completion(tokenizer, getattr(comparisons[i], side)))
                             for i in idx])

    pc, pr = oracle(policy, "chosen"), oracle(policy, "rejected")
    rc, rr = oracle(reference, "chosen"), oracle(reference, "rejected")
    ref_chosen, ref_rejected = ref_pair_logps(Reference(model=reference), "train", data, idx, CPU)
    assert torch.allclose(ref_chosen, rc, atol=1e-4) and torch.allclose(ref_rejected, rr, atol=1e-4)
    loss, stats = dpo_batch_loss(policy, data, idx, ref_chosen, ref_rejected, dc, CPU)
    h = (pc - rc) - (pr - rr)
    assert h.abs().min() > 0.05  # the policy has moved, so every term matters
    assert loss.item() == pytest.approx(expected_loss(name, h, beta, eps).item(), abs=1e-4)
    assert stats["rewards/margins"].item() == pytest.approx((beta * h).mean().item(), abs=1e-4)
    assert stats["logps/chosen"].item() == pytest.approx(pc.mean().item(), abs=1e-4)
    assert stats["logps/rejected"].item() == pytest.approx(pr.mean().item(), abs=1e-4)


# ---------------------------------------------------------------- training runs on an easy problem

N_COMPARISONS = 48
SETTINGS = dict(epochs=3, batch_size=8, lr=3e-3, beta=0.1, heldout_fraction=0.25)  # 36 train, 12 held out: 12 steps


@pytest.fixture(scope="module")
def problem(tmp_path_factory, tokenizer):
    """Comparisons in the contract's format and an "SFT" directory: a tiny random GPT-2 whose config asks for
    dropout, as many users' models do (the trainer must turn it off)."""
    root = tmp_path_factory.mktemp("dpo")
    data = root / "comparisons.jsonl"
    data.write_text("".join(json.dumps(vars(c)) + "\n" for c in easy_comparisons(N_COMPARISONS)))
    sft = root / "sft"
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.1
    model.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return root, data, sft


def run(problem, name: str, **kw):
    root, data, sft = problem
    cfg = load_config(threads=1, dpo={**SETTINGS, **kw})
    out = root / name
    return out, train_dpo(cfg, data, sft, out, CPU)


@pytest.fixture(scope="module")
def cached_run(problem):
    return run(problem, "cached", reference="cached")


@pytest.fixture(scope="module")
def online_run(problem):
    return run(problem, "online", reference="online")


def state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("which", ["cached", "online"])
def test_first_step_loss_is_ln2(which, cached_run, online_run):
    """The trainer's first batch, before any update (policy = reference, dropout off although the model's config
    asks for it): the sigmoid loss is ln 2."""
    _, result = cached_run if which == "cached" else online_run
    assert result["initial_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_cached_log_probs_equal_the_online_forward(problem, cached_run, tokenizer):
    """The cache file holds what the frozen SFT model computes on the same comparisons."""
    from safetensors.torch import load_file

    from rlhfkit.data.preferences import load_comparisons
    from rlhfkit.models.load import load_policy

    _, data_path, sft = problem
    out, _ = cached_run
    cache = load_file(str(out / CACHE_FILE))
    cfg = load_config(dpo=SETTINGS)
    train, test = load_comparisons(data_path, cfg.reward.criterion, cfg.dpo.heldout_fraction, cfg.seed, tokenizer,
                                   stage="dpo")
    online = Reference(model=freeze(load_policy(sft, CPU.device)))
    for split, comparisons in (("train", train), ("heldout", test)):
        data = encode_dpo_pairs(tokenizer, comparisons)
        idx = torch.randperm(len(comparisons), generator=torch.Generator().manual_seed(0))[:7]
        chosen, rejected = ref_pair_logps(online, split, data, idx, CPU)
        logps = cache[f"{split}/logps"]  # (2N,): the chosen rows, then the rejected rows
        assert logps.shape == (2 * len(comparisons),)
        assert torch.allclose(logps[idx], chosen, atol=1e-6, rtol=0)
        assert torch.allclose(logps[idx + len(comparisons)], rejected, atol=1e-6, rtol=0)


def test_cached_reference_trains_like_online(cached_run, online_run):
    (cached_out, cached), (online_out, online) = cached_run, online_run
    a, b = state(cached_out), state(online_out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # 0.0 here: same numbers, other batches
    logs = read_metrics(cached_out / "metrics.jsonl"), read_metrics(online_out / "metrics.jsonl")
    for rec_a, rec_b in zip(*logs, strict=True):
        assert rec_a.keys() == rec_b.keys()
        assert all(rec_a[k] == pytest.approx(rec_b[k], abs=1e-6) for k in rec_a)
    for key in ("heldout_accuracy", "heldout_loss", "heldout_reward_margin", "heldout_logps_chosen"):
        assert cached[key] == pytest.approx(online[key], abs=1e-6)


def test_cached_reference_runs_no_forward_during_training(cached_run, online_run, problem):
    _, cached = cached_run
    _, online = online_run
    steps_per_epoch = cached["n_train"] // SETTINGS["batch_size"]
    # one pass over the data (train + held-out) for the cache, none in any epoch nor in the held-out evaluation
    assert cached["reference_cache"] == "computed"
    assert cached["reference_cache_sequences"] == 2 * (cached["n_train"] + cached["n_heldout"])
    assert cached["reference_forwards_per_epoch"] == [0] * SETTINGS["epochs"]
    assert cached["reference_forwards"] == cached["reference_cache_forwards"] > 0
    # the online reference runs once per step (the counter counts)
    assert online["reference_forwards_per_epoch"] == [steps_per_epoch] * SETTINGS["epochs"]
    assert online["reference_cache_forwards"] == 0
    # a rerun in a directory holding the cache reuses it: no reference forward at all, the same model
    root, data, sft = problem
    shutil.copytree(root / "cached", root / "rerun")
    out, again = run(problem, "rerun", reference="cached")
    assert again["reference_cache"] == "loaded" and again["reference_forwards"] == 0
    assert again["heldout_loss"] == cached["heldout_loss"]
    # other data (here: fewer comparisons) makes another key: the stale cache is not used
    fewer = root / "fewer.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:40]))
    third = train_dpo(load_config(threads=1, dpo={**SETTINGS, "reference": "cached"}), fewer, sft, out, CPU)
    assert third["reference_cache"] == "computed"
    assert third["reference_cache_sequences"] == 2 * (third["n_train"] + third["n_heldout"])


def test_outcome_easy_problem(cached_run):
    """Chosen follows the rule, rejected is cut short: after a short run the implicit reward ranks held-out
    pairs right (at step 0 every implicit reward is 0, so accuracy is 0 and the margin 0), and the policy
    moved probability from the rejected to the chosen completions."""
    out, result = cached_run
    assert result["heldout_accuracy"] >= 0.9
    assert result["heldout_reward_margin"] > 0.1
    assert result["heldout_loss"] < math.log(2) - 0.1
    moved = result["heldout_logps_chosen"] - result["heldout_logps_rejected"]
    start = result["heldout_ref_logps_chosen"] - result["heldout_ref_logps_rejected"]
    assert moved > start + 1.0
    logged = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [10, result["steps"]]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] > 0
    assert logged[-1]["rewards/accuracies"] >= 0.9
    assert logged[-1]["logps/chosen"] - logged[-1]["logps/rejected"] > start + 1.0


def test_metric_names_are_in_the_glossary(cached_run):
    """tests/test_pipeline.py's rule: every logged name is documented in docs/metrics.md."""
    out, _ = cached_run
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / "metrics.jsonl") for k in rec}
    assert {"loss/dpo", "rewards/margins", "logps/chosen", "logps/rejected"} <= logged
    assert logged - glossary == set(), "dpo logs undocumented metrics"


# ---------------------------------------------------------------- config

def test_config_loss_names_are_the_loss_table():
    assert not set(DPO_LOSSES) & set(LISTWISE_DPO_LOSSES)
    assert load_config().dpo.loss in DPO_LOSSES


@pytest.mark.parametrize("overrides,needle", [
    (["dpo.loss='kto'"], "dpo.loss = 'kto': choose 'sigmoid', 'conservative', 'ipo', 'hinge'"),
    (["dpo.label_smoothing=0.1"], "only the 'conservative' loss (cDPO) models flipped labels, and dpo.loss = 'sigmoid'"),
    (["dpo.loss='conservative'", "dpo.label_smoothing=0.5"], "must be in [0, 0.5)"),
    (["dpo.beta=0"], "dpo.beta = 0.0: must be > 0"),
    (["dpo.reference='disk'"], "choose 'cached' or 'online'"),
    (["dpo.heldout_fraction=1"], "must be in (0, 1)"),
    (["dpo.batch_size=0"], "must be at least 1"),
])
def test_bad_dpo_config_messages(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)
    assert load_config(overrides=["dpo.loss='conservative'", "dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1


def test_every_long_phase_shows_progress(problem, capfd):
    """The reference cache (minutes on a real model: 8 silent minutes for 540 pairs on SmolLM2 with one thread)
    and the held-out evaluation each show a progress bar saying what they do."""
    run(problem, "progress", reference="cached")
    err = capfd.readouterr().err
    for phase in ("dpo: reference log-probs (train)", "dpo: reference log-probs (heldout)", "dpo: evaluating (heldout)"):
        assert phase in err, f"no progress shown for {phase!r}"
