"""The command line: bad input gives one clear message, exit code 2, and nothing marked complete."""

import json
import tomllib

import pytest

from rlhfkit.cli import main


def test_unknown_key_did_you_mean(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--set", "ppo.kl_coeff=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'kl_coef'" in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the config is valid


def test_impossible_values(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "o"), "--set", "feedback.k=1"]) == 2
    assert "feedback.k = 1" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o"), "--set", "ppo.rollout_batch_size=100"]) == 2
    assert "must divide ppo.rollout_batch_size = 100" in capsys.readouterr().err


def test_missing_and_non_causal_model_directory(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sft", "--out", str(out), "--set", f"policy.path='{tmp_path / 'nope'}'"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (out / "sft" / "COMPLETE.json").exists()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert main(["sft", "--out", str(out), "--set", f"policy.path='{bert}'"]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_stage_needs_previous_stage(tmp_path, capsys):
    assert main(["ppo", "--out", str(tmp_path / "out")]) == 2
    assert "run `rlhfkit sft --out" in capsys.readouterr().err


def test_malformed_comparisons_name_file_and_line(tmp_path, capsys, tiny_policy_dir):
    data = tmp_path / "c.jsonl"
    good = {"item_id": "a", "prompt": "1 2 3 4 =", "chosen": "5 6 7 8", "rejected": "2 3 4 5"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": None}) + "\n")
    out = tmp_path / "out"
    code = main(["reward", "--out", str(out), "--set", f"reward.data='{data}'", "--set", f"reward.init='{tiny_policy_dir}'"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}:2: field 'rejected'" in err
    assert not (out / "reward" / "COMPLETE.json").exists()


def test_config_command_prints_valid_toml(capsys):
    assert main(["config", "--set", "seed=7"]) == 0
    parsed = tomllib.loads(capsys.readouterr().out)
    assert parsed["seed"] == 7 and parsed["ppo"]["kl_coef"] == 0.4


def test_out_directory_made_with_another_config(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import prepare_out

    prepare_out(load_config(), tmp_path)
    prepare_out(load_config(), tmp_path)  # same config: fine
    with pytest.raises(ConfigError, match=r"another config \(ppo.kl_coef: 0.4 -> 0.0\)"):
        prepare_out(load_config(overrides=["ppo.kl_coef=0"]), tmp_path)
