"""`rlhfkit compare`: the head-to-head matches against a hand count, and one tiny comparison end to end
(every method from the same SFT model, comparisons and reward model; the report's parts are there and agree
with compare.json)."""

import json
import os

import pytest

from rlhfkit.core.errors import ConfigError
from rlhfkit.pipeline.compare import head_to_head, run_compare
from rlhfkit.pipeline.config import load_config

THREADS = int(os.environ.get("RLHFKIT_TEST_THREADS", "1"))


def test_head_to_head_counts_wins_and_half_ties():
    rates, matches = head_to_head({"a": [3, 1, 2, 0], "b": [1, 1, 5, 0], "c": [0, 0, 0, 0]})
    assert rates["a"]["b"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert rates["b"]["a"] == pytest.approx(1 - rates["a"]["b"])
    assert rates["a"]["c"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert rates["c"]["b"] == pytest.approx((0 + 0 + 0 + 0.5) / 4)
    assert len(matches) == 3 * 4  # one per pair of policies and prompt
    assert ("a", "b", 1.0) in matches and ("a", "c", 0.5) in matches
    assert sum(s for x, y, s in matches if (x, y) == ("a", "b")) / 4 == rates["a"]["b"]


def test_compare_methods_are_checked():
    with pytest.raises(ConfigError, match="compare.methods.*'sgd' is not a method"):
        load_config(overrides=["compare.methods=['ppo', 'sgd']"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(overrides=["compare.methods=['ppo', 'ppo']"])


TINY = [
    "sft.n_demos=4000", "sft.epochs=1", "feedback.n_prompts=400", "reward.epochs=2", "ppo.total_steps=6",
    "ppo.rollout_batch_size=32", "ppo.minibatch_size=16", "dpo.epochs=1", "best_of_n.n_prompts=64",
    "eval.n_prompts=200", "eval.dist_samples=100", "device='cpu'", f"threads={THREADS}",
    "compare.methods=['ppo', 'dpo', 'best_of_n']",
]


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = run_compare(load_config(overrides=TINY), out)
    saved = json.loads((out / "compare" / "compare.json").read_text())
    names = ["sft", "ppo", "dpo", "best_of_n"]
    assert list(saved["policies"]) == names and result["methods"] == names[1:]
    # one SFT model, one reward model, one evaluation: every policy answered the same held-out prompts
    assert len(saved["completions"]["prompts"]) == 200
    assert all(len(saved["completions"]["by_policy"][n]) == 200 for n in names)
    for judge in ("reward model", "gold"):
        rates = saved["win_rates"][judge]
        for a in names:
            for b in names:
                if a != b:
                    assert rates[a][b] + rates[b][a] == pytest.approx(1.0)
        assert [r["model"] for r in saved["elo"][judge]] and {r["model"] for r in saved["elo"][judge]} == set(names)
        assert all(r["matches"] == 3 * 200 for r in saved["elo"][judge])
    # best-of-8 by the reward model beats single samples of the same policy by the reward model, by construction
    assert saved["policies"]["best_of_n"]["reward"] > saved["policies"]["sft"]["reward"]
    assert saved["win_rates"]["reward model"]["best_of_n"]["sft"] > 0.5
    assert saved["stages"]["dpo"]["passes"]["backward"] > 0 and saved["stages"]["ppo"]["passes"]["sampled"] == 6 * 32
    report = (out / "compare" / "report.md").read_text()
    for part in ("## Results", "## Head to head", "## Elo", "![ppo curves](ppo_curves.png)", "| best_of_n |"):
        assert part in report
    assert (out / "compare" / "dpo_curves.png").is_file() and (out / "compare" / "COMPLETE.json").is_file()
    # a second compare reuses every stage: nothing is retrained
    mtimes = {m: (out / m / "COMPLETE.json").stat().st_mtime for m in ("sft", "reward", "ppo", "dpo")}
    run_compare(load_config(overrides=TINY), out)
    assert mtimes == {m: (out / m / "COMPLETE.json").stat().st_mtime for m in mtimes}
