"""`feedback.labeler = "human"` through the pipeline: wait for people, keep their labels across reruns,
continue into reward-model training once enough items are labeled."""

from __future__ import annotations

import pytest

from rlhfkit.cli import main
from rlhfkit.data.contract import read_comparisons

from .test_hook import label_everything

HUMAN = ["feedback.labeler='human'", "feedback.n_prompts=8", "feedback.k=3", "feedback.labelers_per_item=2",
         "sft.n_demos=640", "sft.epochs=1", "reward.heldout_fraction=0.5", "reward.epochs=1", "ppo.total_steps=2", "ppo.rollout_batch_size=16",
         "ppo.minibatch_size=8", "eval.n_prompts=50", "eval.dist_samples=50", "device='cpu'"]


def test_human_labels_flow_into_reward_training(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out)] + [a for s in HUMAN for a in ("--set", s)]
    assert main(args) == 3  # SFT done, project created, waiting for people
    err = capsys.readouterr()
    assert "waiting for human labels" in err.err and "rlhfkit label serve" in err.err
    project = out / "labeling"
    assert (out / "sft" / "COMPLETE.json").is_file() and not (out / "feedback" / "COMPLETE.json").exists()

    assert main(args) == 3  # rerun before anyone labeled: still waiting, project untouched
    assert "0/8 items fully labeled" in capsys.readouterr().out

    assert label_everything(project) == 16
    code = main(args)  # the run continues: feedback complete, then RM, PPO, eval
    if code != 0:
        pytest.fail(capsys.readouterr().err)
    comparisons = read_comparisons(out / "feedback" / "comparisons.jsonl")
    assert comparisons and all(sorted(c.labeler_ids) == ["ann", "ben"] for c in comparisons)
    assert (out / "reward" / "COMPLETE.json").is_file() and (out / "eval" / "report.md").is_file()
