"""The command line: bad input gives one clear message, exit code 2, and nothing marked complete."""

import json
import tomllib

import pytest

from rlhfkit.cli import main


def test_unknown_key_did_you_mean(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--set", "ppo.kl_coeff=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'ppo.kl_coef'" in err and "Traceback" not in err
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
    assert parsed["seed"] == 7 and parsed["ppo"]["kl_coef"] == 0.6


def test_config_command_prints_lists_as_valid_toml(capsys):
    assert main(["config", "--set", 'feedback.criteria=["helpfulness", "harmlessness"]']) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text)["feedback"]["criteria"] == ["helpfulness", "harmlessness"]
    assert 'criteria = ["helpfulness", "harmlessness"]  # ' in text


# ----------------------------------------------------------------------------------------------------
# Bad input files: one `error:` line naming the file (and line), exit 2, never a traceback.

@pytest.fixture
def no_training(monkeypatch):
    """`main(["run", ...])` must stop at the bad input; should it not, fail at once instead of training."""
    def refuse(*args, **kwargs):
        pytest.fail("the pipeline started despite the bad input")

    monkeypatch.setattr("rlhfkit.pipeline.stages.run_pipeline", refuse)
    monkeypatch.setattr("rlhfkit.pipeline.stages.run_stage", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("data,line", [(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff", 3), ("seed = 1\n".encode("utf-16"), 1)],
                         ids=["binary", "utf-16"])
def test_config_file_not_utf8(tmp_path, capsys, data, line, no_training):
    path = tmp_path / "my.toml"
    path.write_bytes(data)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _one_error_line(capsys)
    assert f"{path}:{line}: not UTF-8 text" in err and "save it as UTF-8" in err
    assert not (tmp_path / "out").exists()


def test_comparisons_file_not_utf8(tmp_path, capsys, tiny_policy_dir):
    capsys.readouterr()  # the fixture's save_pretrained output
    data = tmp_path / "c.jsonl"
    data.write_bytes((json.dumps({"item_id": "a", "prompt": "1 =", "chosen": "2", "rejected": "3"}) + "\n").encode("utf-16"))
    out = tmp_path / "out"
    assert main(["reward", "--out", str(out), "--set", f"reward.data='{data}'", "--set", f"reward.init='{tiny_policy_dir}'"]) == 2
    assert f"{data}:1: not UTF-8 text" in _one_error_line(capsys)
    assert not (out / "reward" / "COMPLETE.json").exists()


def test_model_directory_without_weights_or_tokenizer(tmp_path, capsys, tiny_policy_dir):
    capsys.readouterr()  # the fixture's save_pretrained output
    out = tmp_path / "out"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_policy_dir / "config.json").read_text())
    assert main(["sft", "--out", str(out), "--set", f"policy.path='{bare}'"]) == 2
    assert "has a config.json but no weights (looked for model.safetensors" in _one_error_line(capsys)
    (bare / "model.safetensors").write_bytes((tiny_policy_dir / "model.safetensors").read_bytes())
    assert main(["sft", "--out", str(out), "--set", f"policy.path='{bare}'"]) == 2  # weights, no tokenizer
    assert f"policy.path: {bare} has no tokenizer files" in _one_error_line(capsys)
    assert not (out / "sft" / "COMPLETE.json").exists() and not (out / "sft" / "metrics.jsonl").exists()


def test_context_too_short_for_the_task(tmp_path, capsys, no_training):
    assert main(["run", "--out", str(tmp_path / "out"), "--set", "policy.n_ctx=8"]) == 2
    assert "--set policy.n_ctx = 8: the digits task needs 12 positions" in _one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------
# The command line itself: help that tells the truth, --version, `run --out` resumes with its config.

def test_run_uses_the_saved_config_of_out(tmp_path, monkeypatch):
    from rlhfkit.cli import _config_for, build_parser
    from rlhfkit.core.config import config_to_toml
    from rlhfkit.pipeline.config import load_config

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.toml").write_text(config_to_toml(load_config(overrides=["seed=5", "sft.n_demos=1000"])))
    for command in ("run", "sft"):  # run resumes exactly as a stage command does
        cfg = _config_for(build_parser().parse_args([command, "--out", str(out), "--set", "ppo.kl_coef=0.1"]))
        assert (cfg.seed, cfg.sft.n_demos, cfg.ppo.kl_coef) == (5, 1000, 0.1)
    given = tmp_path / "given.toml"
    given.write_text("seed = 7\n")  # a config file named on the command line wins over the saved one
    assert _config_for(build_parser().parse_args(["run", str(given), "--out", str(out)])).seed == 7
    assert _config_for(build_parser().parse_args(["run", "--out", str(tmp_path / "new")])).seed == 0
    monkeypatch.chdir(tmp_path)  # no --out: runs/TASK, and the config saved there
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    (tmp_path / "runs" / "digits" / "config.toml").write_text("seed = 9\n[sft]\nn_demos = 32\nbatch_size = 32\n")
    cfg = _config_for(build_parser().parse_args(["run", "--set", "sft.n_demos=40"]))  # valid only on top of it
    assert (cfg.seed, cfg.sft.n_demos, cfg.sft.batch_size) == (9, 40, 32)


def test_saved_config_error_names_its_line(tmp_path, capsys, no_training):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.toml").write_text("seed = 1\n[ppo]\nkl_coeff = 1\n")
    assert main(["run", "--out", str(out)]) == 2
    assert f"{out / 'config.toml'}:3: unknown key 'ppo.kl_coeff'; did you mean 'ppo.kl_coef'?" in _one_error_line(capsys)


def test_help_and_version(capsys):
    import rlhfkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"rlhfkit {rlhfkit.__version__}\n"
    for command in ("run", "sft"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: OUT/config.toml when it exists" in text, command
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "TOML config file" in text and "--set SECTION.KEY=VALUE" in text and "override a config field" in text


def test_importing_the_cli_is_light():
    import subprocess
    import sys

    code = "import sys, rlhfkit.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_prints_a_template_for_task_none_before_it_is_runnable(capsys):
    """`rlhfkit config --set task='none'` is how a user starts a config for their own model: a template to fill
    in, with what it still lacks on top (it refused before policy.path was set); `run` still refuses it."""
    assert main(["config", "--set", "task='none'"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Not runnable as it stands:") and "policy.path" in out.splitlines()[0]
    assert tomllib.loads(out)["task"] == "none"
    assert main(["config", "--set", "task='nonee'"]) == 2  # a task that does not exist is still an error
    assert main(["run", "--set", "task='none'", "--out", "/nonexistent/x"]) == 2


def test_a_format_error_in_a_run_points_to_a_command_that_exists(tmp_path, capsys, tiny_policy_dir):
    """`rlhfkit run`/`reward` read reward.data by its fields; their errors must not suggest `--from`, which only
    `rlhfkit data convert` and `data check` take."""
    capsys.readouterr()  # the fixture's save_pretrained output
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "1 =", "chosen": "2", "rejected": 3}) + "\n")  # TRL fields, a bad value
    assert main(["reward", "--out", str(tmp_path / "out"), "--set", f"reward.data='{data}'",
                 "--set", f"reward.init='{tiny_policy_dir}'"]) == 2
    err = _one_error_line(capsys)
    assert f"{data}:1" in err and "rlhfkit data convert FILE OUT --from FORMAT" in err
    assert "; --from chooses" not in err
    unknown = tmp_path / "u.jsonl"
    unknown.write_text(json.dumps({"question": "1 ="}) + "\n")
    assert main(["reward", "--out", str(tmp_path / "out"), "--set", f"reward.data='{unknown}'",
                 "--set", f"reward.init='{tiny_policy_dir}'"]) == 2
    assert "rlhfkit data convert FILE OUT --from FORMAT" in capsys.readouterr().err  # after the table of formats
