"""SimPO and ORPO (rlhfkit/algorithms/simpo.py, orpo.py) on DPO's trainer without a reference: the batch loss from
per-row oracle log-probs and lengths, no reference anywhere in a run, the outcome on an easy problem, the config.
The losses' values (closed forms, TRL): tests/test_preference_losses.py."""

import math
import re
from pathlib import Path

import pytest
import torch

from rlhfkit.algorithms.dpo import CACHE_FILE, completion_lengths, encode_dpo_pairs, reference_free_batch_loss, train_dpo
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.batching import encode_completion, encode_prompt
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.pipeline.config import load_config
from test_dpo import easy_comparisons, oracle_sequence_logprob

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), None)
SETTINGS = dict(epochs=3, batch_size=8, lr=3e-3, heldout_fraction=0.25)  # 36 train, 12 held out: 12 steps


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_batch_loss_matches_per_row_oracle(name, tokenizer, sharp_policy):
    """The trainer's batch loss from per-row oracle log-probs and token counts: fails on chosen and rejected swapped
    in the stacking, lengths off by one (EOS dropped or the prompt counted), a dropped beta or gamma."""
    comparisons = easy_comparisons(8)  # rejected = chosen cut to three digits: lengths differ by two tokens
    data = encode_dpo_pairs(tokenizer, comparisons)
    policy = sharp_policy("llama")
    idx = torch.tensor([6, 1, 4, 0, 3])
    section = load_config(**{name: {"beta": 0.7, **({"gamma": 0.3} if name == "simpo" else {})}})
    dc = getattr(section, name)

    def oracle(side):  # (b,) summed log-probs and (b,) completion lengths (EOS included), from unpadded rows
        rows = [(encode_prompt(tokenizer, comparisons[i].prompt), encode_completion(tokenizer, getattr(comparisons[i], side)))
                for i in idx]
        return (torch.tensor([oracle_sequence_logprob(policy, p, c) for p, c in rows]),
                torch.tensor([float(len(c)) for _, c in rows]))

    (pc, lc), (pr, lr) = oracle("chosen"), oracle("rejected")
    assert torch.equal(torch.stack(completion_lengths(data, idx)).float(), torch.stack([lc, lr]))
    assert (lc - lr == 1).all()  # four digits + EOS vs three + EOS: a length-blind loss would differ
    mc, mr = pc / lc, pr / lr
    if name == "simpo":
        expected = -torch.nn.functional.logsigmoid(0.7 * (mc - mr) - 0.3).mean()
    else:
        log_odds = (mc - torch.log(-torch.expm1(mc))) - (mr - torch.log(-torch.expm1(mr)))
        expected = -mc.mean() - 0.7 * torch.nn.functional.logsigmoid(log_odds).mean()
    loss, stats = reference_free_batch_loss(policy, data, idx, dc, CPU)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert stats["rewards/margins"].item() == pytest.approx((0.7 * (mc - mr)).mean().item(), abs=1e-4)
    assert stats["logps/chosen"].item() == pytest.approx(pc.mean().item(), abs=1e-4)


@pytest.fixture(scope="module")
def problem(tmp_path_factory, tokenizer):
    import json

    root = tmp_path_factory.mktemp("reference_free")
    data = root / "comparisons.jsonl"
    data.write_text("".join(json.dumps(vars(c)) + "\n" for c in easy_comparisons(48)))
    sft = root / "sft"
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
    model.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return root, data, sft


@pytest.fixture(scope="module")
def runs(problem):
    root, data, sft = problem
    out = {}
    for name, extra in (("simpo", {"beta": 2.0, "gamma": 0.5}), ("orpo", {"beta": 0.5})):
        cfg = load_config(threads=1, **{name: {**SETTINGS, **extra}})
        out[name] = (root / name, train_dpo(cfg, data, sft, root / name, CPU, section=name))
    return out


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_no_reference_anywhere(name, runs, monkeypatch):
    """No reference model loaded, no reference forward, no cache written; the loader is asked for one model."""
    out, result = runs[name]
    assert result["reference"] == "none" and result["reference_cache"] == "none"
    assert result["reference_forwards"] == 0 and result["reference_forwards_per_epoch"] == [0] * SETTINGS["epochs"]
    assert result["heldout_ref_logps_chosen"] is None
    assert not (out / CACHE_FILE).exists()
    assert result["passes"]["forward"] == 2 * result["n_heldout"]  # the held-out evaluation only


def test_policy_and_reference_is_asked_for_no_copy(problem, monkeypatch):
    import rlhfkit.algorithms.dpo as dpo

    asked = []
    real = dpo.policy_and_reference
    monkeypatch.setattr(dpo, "policy_and_reference", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    root, data, sft = problem
    cfg = load_config(threads=1, simpo={**SETTINGS, "epochs": 1}, dpo={"reference": "online"})
    train_dpo(cfg, data, sft, root / "asked", CPU, section="simpo")
    assert asked == [{"frozen_copy": False}]


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_outcome_easy_problem(name, runs):
    """Chosen follows the rule, rejected is cut short: the held-out pairs are ranked right by the implicit reward
    and the policy moved probability from the rejected to the chosen completions."""
    out, result = runs[name]
    assert result["heldout_accuracy"] >= 0.9
    assert result["heldout_reward_margin"] > 0.1
    assert result["heldout_loss"] < result["initial_loss"] - 0.3
    logged = read_metrics(out / "metrics.jsonl")
    assert logged[-1]["rewards/accuracies"] >= 0.9
    if name == "orpo":  # the NLL term fine-tunes on the chosen replies (the first loss is the NLL + beta * L_OR >= NLL)
        assert logged[-1]["loss/nll"] < result["initial_loss"] - 0.5
        assert logged[-1]["log_odds_ratio"] > 0


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_metric_names_are_in_the_glossary(name, runs):
    out, _ = runs[name]
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / "metrics.jsonl") for k in rec}
    assert logged - glossary == set(), f"{name} logs undocumented metrics"


@pytest.mark.parametrize("overrides,needle", [
    (["simpo.beta=0"], "simpo.beta = 0.0: must be > 0"),
    (["simpo.gamma=-1"], "simpo.gamma = -1.0: must be >= 0"),
    (["orpo.heldout_fraction=0"], "must be in (0, 1)"),
    (["orpo.batch_size=0"], "must be at least 1"),
    (["simpo.criterion='*'"], "name one criterion"),
    (["orpo.gamma=1"], "orpo.gamma"),
])
def test_bad_config_messages(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)


def test_first_step_loss_is_the_untrained_policys(runs, problem):
    """SimPO's first logged loss is the untrained policy's (no reference: not ln 2 in general)."""
    _, result = runs["simpo"]
    assert math.isfinite(result["initial_loss"]) and result["initial_loss"] != pytest.approx(math.log(2), abs=1e-3)
