"""A reward model learns one criterion: `reward.criterion` picks it, mixed labels are refused, never merged."""

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import Comparison
from rlhfkit.data.preferences import select_criterion


def comparisons(counts: dict[str, int]) -> list[Comparison]:
    """`n` comparisons per criterion, each of its own item."""
    return [Comparison(f"{c}-{i:03d}", f"{i % 10} 1 2 3 =", "1 2 3 4", "4 3 2 1", criterion=c)
            for c, n in counts.items() for i in range(n)]


def write_jsonl(path, records: list[Comparison]):
    path.write_text("".join(json.dumps(vars(r)) + "\n" for r in records))
    return path


def test_single_criterion_is_used_whatever_its_name():
    data = comparisons({"helpfulness": 3})
    assert select_criterion(data, "", "c.jsonl") == (data, "helpfulness")
    assert select_criterion(data, "helpfulness", "c.jsonl") == (data, "helpfulness")


def test_named_criterion_selects_only_its_comparisons():
    data = comparisons({"helpfulness": 3, "harmlessness": 2})
    selected, name = select_criterion(data, "harmlessness", "c.jsonl")
    assert name == "harmlessness" and selected == data[3:]


def test_mixed_criteria_without_reward_criterion_is_an_error():
    with pytest.raises(DataError) as e:
        select_criterion(comparisons({"helpfulness": 3, "harmlessness": 2}), "", "data/mixed.jsonl")
    msg = str(e.value)
    assert msg.startswith("data/mixed.jsonl: ") and "set reward.criterion to one of them" in msg
    assert "'helpfulness' (3 comparisons), 'harmlessness' (2 comparisons)" in msg


def test_unknown_criterion_names_those_present():
    with pytest.raises(DataError) as e:
        select_criterion(comparisons({"helpfulness": 3}), "honesty", "c.jsonl")
    assert str(e.value) == "c.jsonl: no comparisons with reward.criterion = 'honesty'; the file holds 'helpfulness' (3 comparisons)"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    from rlhfkit.models.load import TinyModelSpec, build_tiny_policy

    path = tmp_path_factory.mktemp("policy")
    build_tiny_policy(TinyModelSpec("gpt2", 1, 16, 2, 32), tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_refuses_mixed_criteria_in_one_line(tmp_path, capsys, policy_dir):
    data = write_jsonl(tmp_path / "mixed.jsonl", comparisons({"helpfulness": 40, "harmlessness": 20}))
    out = tmp_path / "out"
    code = main(["reward", "--out", str(out), "--set", f"reward.data='{data}'", "--set", f"reward.init='{policy_dir}'"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{data}: " in err and "'helpfulness' (40 comparisons)" in err and "reward.criterion" in err
    assert not (out / "reward" / "COMPLETE.json").exists()


def test_reward_stage_trains_on_the_chosen_criterion_and_records_it(tmp_path, policy_dir):
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    data = write_jsonl(tmp_path / "mixed.jsonl", comparisons({"helpfulness": 20, "harmlessness": 12}))
    cfg = load_config(reward={"data": str(data), "init": str(policy_dir), "criterion": "harmlessness", "epochs": 1,
                              "batch_size": 8, "heldout_fraction": 0.25}, device="cpu")
    result = run_stage("reward", cfg, tmp_path / "out")
    assert result["criterion"] == "harmlessness" and result["n_train"] + result["n_heldout"] == 12
