"""A task made of files (rlhfkit.tasks.files): training and held-out prompts never overlap, the evaluation
draws only held-out prompts, training draws every prompt once before any repeats, and a file replaces only
what it holds (the built-in task keeps its gold metrics)."""

import json
import random

import pytest

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.pipeline.config import load_config
from rlhfkit.tasks import task_for


def _files(tmp_path, n=200):
    (tmp_path / "p.txt").write_text("".join(f"{i % 10} {i // 10 % 10} {i // 100} 1 =\n" for i in range(n)))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": f"{i % 10} 2 3 4 =", "completion": f"{i % 9} 1 2 3"})
                                             + "\n" for i in range(n)))
    return tmp_path / "p.txt", tmp_path / "s.jsonl"


def test_prompt_split_and_draws(tmp_path):
    prompts, sft = _files(tmp_path)
    task = task_for(load_config(overrides=[f"data.prompts='{prompts}'", f"data.sft='{sft}'", "data.heldout_fraction=0.2"]))
    train, heldout = task._prompts
    assert train and heldout and not set(train) & set(heldout) and len(train) + len(heldout) == 200
    assert 10 <= len(heldout) <= 70  # about a fifth, by item hash
    drawn = task.prompts(len(train), random.Random(0))
    assert sorted(drawn) == sorted(train)  # every training prompt once before any repeats
    assert set(task.prompts(3 * len(train), random.Random(1))) == set(train)
    assert set(task.heldout_prompts(1000, random.Random(2))) == set(heldout)  # all of them, none from training
    demos, held = task.sft_split(48000, random.Random(0))
    assert demos and held and not {p for p, _ in demos} & {p for p, _ in held}
    assert task.name == "digits" and "preferred_first_rate" in task.gold_metrics(["1 2 3 4 ="], ["2 3 4 5"])


def test_too_few_prompts_to_hold_some_out(tmp_path):
    (tmp_path / "one.txt").write_text("1 2 3 4 =\n")
    with pytest.raises(RlhfkitError, match="data.prompts .* 0 held-out|data.prompts .* 0 training"):
        task_for(load_config(overrides=[f"data.prompts='{tmp_path / 'one.txt'}'"]))


def test_eval_asks_for_more_prompts_than_held_out_and_is_told(tmp_path, capsys):
    """eval.n_prompts above the file's held-out part: each held-out prompt once, and a note saying so."""
    from rlhfkit.evaluation.evaluate import heldout_prompts

    prompts, sft = _files(tmp_path)
    task = task_for(load_config(overrides=[f"data.prompts='{prompts}'", f"data.sft='{sft}'", "data.heldout_fraction=0.2"]))
    held = heldout_prompts(task, 1000, seed=0)
    assert sorted(held) == sorted(task._prompts[1]) and len(set(held)) == len(held)
    assert f"eval.n_prompts = 1000, but the held-out part of the prompts holds {len(held)}" in capsys.readouterr().err
    assert len(heldout_prompts(task, 5, seed=0)) == 5 and capsys.readouterr().err == ""
