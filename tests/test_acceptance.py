"""The default pipeline, as a user runs it, meets issue 2's targets; without the KL penalty, KL grows.

About two minutes on a 2-core CPU: the built-in config is small enough to be tested as shipped.
"""

import shutil

import pytest

from rlhfkit.config import load_config
from rlhfkit.pipeline import run_pipeline, run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    return out, run_pipeline(load_config(overrides=["device='cpu'"]), out)


def test_default_run_meets_targets(default_run):
    _, s = default_run
    sft, ppo = s["eval"]["sft"], s["eval"]["ppo"]
    assert sft["later_rule_validity"] >= 0.98
    assert 0.25 <= sft["preferred_first_rate"] <= 0.40
    assert s["reward"]["heldout_accuracy"] >= 0.95
    assert ppo["preferred_first_rate"] >= 0.95
    assert ppo["later_rule_validity"] >= 0.95
    assert ppo["kl_first_position_share"] > 0.5  # most of the KL is spent where the preference is


def test_without_kl_penalty_kl_grows_and_later_digits_drift(default_run, tmp_path):
    out, s = default_run
    free = tmp_path / "kl0"
    shutil.copytree(out, free, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
    cfg = load_config(overrides=["device='cpu'", "ppo.kl_coef=0"])
    run_stage("ppo", cfg, free, replace_config=True)
    ev = run_stage("eval", cfg, free)
    assert ev["ppo"]["kl"] > 2 * s["eval"]["ppo"]["kl"]
    assert ev["ppo"]["later_rule_validity"] < s["eval"]["ppo"]["later_rule_validity"]
    assert ev["ppo"]["kl_first_position_share"] < s["eval"]["ppo"]["kl_first_position_share"]
