"""The output directory stays truthful: failed reruns keep the previous outputs, the recorded config always
describes what produced them, checks run before anything is written, one process at a time, PPO continues
when only its budget grew. A micro budget (seconds); no outcome is asserted here."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from rlhfkit.core.errors import DataError, RlhfkitError
from rlhfkit.core.runio import read_metrics
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import locked, run_pipeline, run_stage

MICRO = ["sft.n_demos=640", "sft.epochs=1", "feedback.n_prompts=120", "reward.epochs=1", "ppo.total_steps=2",
         "ppo.rollout_batch_size=16", "ppo.minibatch_size=16", "ppo.ppo_epochs=1", "ppo.checkpoint_every=1",
         "eval.n_prompts=40", "eval.dist_samples=40", "device='cpu'", "threads=1"]


def cfg(*extra):
    return load_config(overrides=MICRO + list(extra))


def snapshot(out):
    """Every file under OUT (but the lock) with its modification time: what "left as it was" means."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("state") / "out"
    run_pipeline(cfg(), out)
    return out


@pytest.fixture
def copy(done, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(done, dst)
    return dst


def write_comparisons(path, prompt="1 2 3 4 =", chosen="2 3 4 5", rejected="6 6 6 6", n=40):
    path.write_text("".join(json.dumps({"item_id": f"i{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
                            + "\n" for i in range(n)))
    return path


def test_failed_rerun_keeps_previous_outputs(copy, tmp_path):
    before = snapshot(copy)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "prompt": "1 ="}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: holds prompts, not preference pairs .*fields of .*bad.jsonl:1"):
        run_stage("reward", cfg(f"reward.data='{bad}'"), copy)
    assert snapshot(copy) == before


def test_stage_command_refuses_inputs_it_cannot_honour(copy):
    """`rlhfkit eval --set sft.epochs=5` must not record epochs = 5 when the SFT model was trained with 1."""
    before = snapshot(copy)
    with pytest.raises(RlhfkitError, match=r"needs 'sft' made with this config.*sft.epochs: 1 -> 5"):
        run_stage("eval", cfg("sft.epochs=5"), copy)
    assert snapshot(copy) == before
    assert load_config(copy / "config.toml").sft.epochs == 1


def test_run_refuses_a_changed_config_unless_update(copy):
    before = snapshot(copy)
    with pytest.raises(RlhfkitError, match=r"ppo: ppo.kl_coef: 0.6 -> 0.1.*--update"):
        run_pipeline(cfg("ppo.kl_coef=0.1"), copy)
    assert snapshot(copy) == before
    run_pipeline(cfg("ppo.kl_coef=0.1"), copy, update=True)
    after = snapshot(copy)
    for stage in ("sft", "feedback", "reward"):  # upstream of the change: untouched
        assert after[f"{stage}/COMPLETE.json"] == before[f"{stage}/COMPLETE.json"]
    assert after["ppo/COMPLETE.json"] != before["ppo/COMPLETE.json"]
    assert load_config(copy / "config.toml").ppo.kl_coef == 0.1
    assert json.loads((copy / "summary.json").read_text())["config"]["ppo"]["kl_coef"] == 0.1


def test_redone_stage_removes_stale_later_outputs(copy):
    run_stage("ppo", cfg(), copy, fresh=True)
    assert not (copy / "eval").exists(), "a report of the previous PPO model must not stay behind"
    run_stage("eval", cfg(), copy)
    assert (copy / "eval" / "report.md").is_file() and (copy / "eval" / "COMPLETE.json").is_file()


def test_more_ppo_steps_continue_and_equal_a_longer_run(copy, tmp_path):
    first = json.loads((copy / "ppo" / "COMPLETE.json").read_text())
    result = run_pipeline(cfg("ppo.total_steps=4"), copy, update=True)["ppo"]
    assert result["steps"] == 4 and result["resumed"] is True
    assert [m["step"] for m in read_metrics(copy / "ppo" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert result["wall_time_s"] > first["wall_time_s"]  # the whole run's time, not only the continuation
    longer = tmp_path / "longer"
    shutil.copytree(copy, longer, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
    run_stage("ppo", cfg("ppo.total_steps=4"), longer)
    a, b = load_file(copy / "ppo" / "model" / "model.safetensors"), load_file(longer / "ppo" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), "continuing to 4 steps differs from running 4 steps"


def test_second_process_on_the_same_out_is_refused(copy):
    with locked(copy):  # another open of the lock file conflicts, as a second process's would
        with pytest.raises(RlhfkitError, match="is in use by rlhfkit process"):
            run_stage("eval", cfg(), copy, fresh=True)


@pytest.mark.parametrize("override,needle", [
    ("device='cuda'", "CUDA is not available"),
    ("policy.path='/nonexistent/model'", "does not exist"),
    ("reward.data='/nonexistent/c.jsonl'", "no such file"),
])
def test_checks_run_before_anything_is_written(tmp_path, override, needle):
    out = tmp_path / "out"
    with pytest.raises(RlhfkitError, match=needle):
        run_pipeline(cfg(override), out)
    assert not out.exists()


def test_text_the_tokenizer_cannot_represent_is_refused_before_training(tmp_path):
    english = write_comparisons(tmp_path / "en.jsonl", prompt="How do I fix a flat tyre?",
                                chosen="Patch the tube, then pump it up.", rejected="Buy a new bike.")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"are <unk> under the reward model's tokenizer.*cannot represent"):
        run_pipeline(cfg(f"reward.data='{english}'"), out)
    assert not out.exists()


def test_reward_data_replaces_feedback_and_is_reported(tmp_path):
    data = write_comparisons(tmp_path / "digits.jsonl")
    out = tmp_path / "out"
    summary = run_pipeline(cfg(f"reward.data='{data}'"), out)
    assert "feedback" not in summary and not (out / "feedback").exists()
    assert summary["reward"]["data"] == str(data)
    data.write_text(data.read_text().replace("6 6 6 6", "7 7 7 7"))  # edited data: the reward model is stale
    with pytest.raises(RlhfkitError, match="reward_data_sha256"):
        run_pipeline(cfg(f"reward.data='{data}'"), out)


def test_method_dpo_runs_only_the_stages_it_needs(done, tmp_path):
    """`method = "dpo"`: the stages it reads (no reward model), eval keyed by the method's name, its curves in
    the report; switching the method keeps the shared SFT and feedback stages."""
    out = tmp_path / "out"
    shutil.copytree(done, out)
    with pytest.raises(RlhfkitError, match=r"eval: ppo: no longer read.*dpo: now read"):
        run_pipeline(cfg("method='dpo'", "dpo.epochs=1"), out)  # the PPO run's evaluation would be replaced
    summary = run_pipeline(cfg("method='dpo'", "dpo.epochs=1"), out, update=True)
    assert set(summary["eval"]) >= {"sft", "dpo"} and "reward" not in summary["eval"]["dpo"]
    assert (out / "dpo" / "model" / "model.safetensors").is_file() and (out / "eval" / "dpo_curves.png").is_file()
    assert json.loads((out / "sft" / "COMPLETE.json").read_text()) == json.loads((done / "sft" / "COMPLETE.json").read_text())
    assert "![dpo curves](dpo_curves.png)" in (out / "eval" / "report.md").read_text()
    assert summary["dpo"]["reference_forwards"] is not None


def test_unknown_method_is_a_config_error():
    with pytest.raises(RlhfkitError, match=r"method = 'ppo2'.*'ppo', 'dpo'"):
        cfg("method='ppo2'")


def test_dpo_data_is_checked_before_anything_is_written(tmp_path):
    """method = "dpo" reads reward.data itself: its preflight checks the data with DPO's own settings."""
    english = write_comparisons(tmp_path / "en.jsonl", prompt="How do I fix a flat tyre?",
                                chosen="Patch the tube, then pump it up.", rejected="Buy a new bike.")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"under the dpo policy's tokenizer"):
        run_pipeline(cfg("method='dpo'", f"reward.data='{english}'"), out)
    few = write_comparisons(tmp_path / "few.jsonl", n=1)
    with pytest.raises(DataError, match=r"change dpo.heldout_fraction"):
        run_pipeline(cfg("method='dpo'", f"reward.data='{few}'"), out)
    assert not out.exists()


def test_installing_one_method_keeps_the_evaluation_of_another(tmp_path):
    """Switching method on an OUT: installing DPO removes an evaluation made from DPO, not one made from PPO."""
    from rlhfkit.core.runio import write_json
    from rlhfkit.pipeline.stages import _install, stage_inputs

    ppo_cfg, dpo_cfg = load_config(), load_config(overrides=["method='dpo'"])
    for made_from, kept in ((ppo_cfg, True), (dpo_cfg, False)):
        (tmp_path / "eval").mkdir(exist_ok=True)
        write_json(tmp_path / "eval" / "INPUTS.json", stage_inputs("eval", made_from))
        (tmp_path / ".partial" / "dpo").mkdir(parents=True)
        _install(tmp_path, "dpo", tmp_path / ".partial" / "dpo", dpo_cfg)
        assert (tmp_path / "eval").exists() == kept
