"""Experiment trackers beside metrics.jsonl (rlhfkit/core/tracking.py, docs/tracking.md): what MetricsLog hands
TensorBoard is read back from the event files (steps, values, names; a resume that logs no step twice), the JSONL
record is the same with trackers as without, only the main process writes, and the preflight names the package to
install. W&B (offline) and Trackio run when installed."""

import json
import subprocess
import sys
import time

import pytest

from rlhfkit.core import tracking
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import MetricsLog, read_metrics

RECORDS = [
    {"step": 1, "loss/sft": 2.5, "lr": 1e-3, "sample": "a text", "eval/loss": None},
    {"step": 2, "loss/sft": 2.0, "lr": 5e-4, "sample": "more", "reward/accuracy": 0.75, "flags": [1, 2]},
    {"step": 3, "loss/sft": 1.5, "lr": 2.5e-4, "reward/accuracy": 1},
]


@pytest.fixture(autouse=True)
def no_process_default():
    """Each test starts, and leaves the process, with no trackers chosen."""
    tracking.configure_tracking([])
    yield
    tracking.configure_tracking([])


def write(path, records, **kwargs):
    log = MetricsLog(path, **kwargs)
    for record in records:
        log.log(record)
    log.close()


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the event files under log_dir hold, as TensorBoard would show it: {name: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_every_number_logged_under_its_name_and_step(tmp_path):
    pytest.importorskip("tensorboard")
    torch = pytest.importorskip("torch")
    records = [*RECORDS, {"step": 4, "loss/sft": torch.tensor(1.25)}]  # a 0-d tensor, as trainers log
    write(tmp_path / "sft" / "metrics.jsonl", records, tracking=["tensorboard"])

    scalars = tensorboard_scalars(tmp_path / "sft" / "tensorboard")
    assert set(scalars) == {"loss/sft", "lr", "reward/accuracy"}  # not "step"; no string, None or list
    assert scalars["loss/sft"] == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.25)]
    assert scalars["reward/accuracy"] == [(2, 0.75), (3, 1.0)]
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3]
    assert [v for _, v in scalars["lr"]] == pytest.approx([1e-3, 5e-4, 2.5e-4])  # float32 in the event file


def test_a_resumed_run_logs_no_step_twice_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    path = tmp_path / "ppo" / "metrics.jsonl"
    write(path, [{"step": s, "loss/x": float(s)} for s in range(1, 6)], tracking=["tensorboard"])
    # Killed after step 5, resumed from the checkpoint of step 3: steps 4-5 again, with other values.
    write(path, [{"step": s, "loss/x": 10.0 * s} for s in (4, 5, 6)], resume_after_step=3, tracking=["tensorboard"])

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert tensorboard_scalars(path.parent / "tensorboard")["loss/x"] == expected
    assert [(r["step"], r["loss/x"]) for r in read_metrics(path)] == expected  # as the record says

    # A fresh start (no resume) replaces the earlier run's steps, as it empties metrics.jsonl.
    write(path, [{"step": 1, "loss/x": -1.0}], tracking=["tensorboard"])
    assert tensorboard_scalars(path.parent / "tensorboard")["loss/x"] == [(1, -1.0)]


def test_the_jsonl_record_is_the_same_with_trackers_as_without(tmp_path):
    pytest.importorskip("tensorboard")
    write(tmp_path / "plain" / "metrics.jsonl", RECORDS)
    tracking.configure_tracking(["tensorboard"])  # the process default, as the pipeline sets it
    write(tmp_path / "tracked" / "metrics.jsonl", RECORDS)

    plain = (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert (tmp_path / "tracked" / "metrics.jsonl").read_text() == plain
    assert [json.loads(line) for line in plain.splitlines()] == RECORDS
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert list((tmp_path / "tracked" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_process_default_applies_unless_the_log_says_otherwise(tmp_path):
    pytest.importorskip("tensorboard")
    tracking.configure_tracking(["tensorboard", "tensorboard"], config={"seed": 0})
    assert tracking.tracking_default() == (("tensorboard",), {"seed": 0})
    write(tmp_path / "off" / "metrics.jsonl", RECORDS, tracking=[])  # the keyword wins
    assert not (tmp_path / "off" / "tensorboard").exists()
    tracking.configure_tracking([])  # off again
    write(tmp_path / "default" / "metrics.jsonl", RECORDS)
    assert not (tmp_path / "default" / "tensorboard").exists()


def test_a_stage_that_logs_nothing_opens_no_tracker(tmp_path):
    write(tmp_path / "eval" / "metrics.jsonl", [], tracking=["tensorboard"])
    assert (tmp_path / "eval" / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "eval" / "tensorboard").exists()


@pytest.mark.parametrize("resume_after_step", [None, 1])
def test_only_the_main_process_writes(tmp_path, monkeypatch, resume_after_step):
    path = tmp_path / "sft" / "metrics.jsonl"
    write(path, RECORDS)
    before = path.read_text()
    monkeypatch.setenv("RANK", "1")
    write(path, [{"step": 9, "loss/sft": 0.0}], resume_after_step=resume_after_step, tracking=["tensorboard"])
    assert path.read_text() == before  # neither emptied, cut nor appended to
    assert not (tmp_path / "sft" / "tensorboard").exists()
    write(tmp_path / "other" / "metrics.jsonl", RECORDS)
    assert not (tmp_path / "other").exists()


def test_check_trackers_names_the_field_and_the_fix(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.tracking: 'wandb' needs the 'wandb' package") as error:
        tracking.check_trackers(["wandb"])
    assert "pip install 'rlhfkit[tracking]'" in str(error.value) and "pip install wandb" in str(error.value)
    with pytest.raises(ConfigError, match="train.tracking"):
        tracking.configure_tracking(["wandb"])  # the process default is checked the same way
    with pytest.raises(ConfigError, match="train.tracking"):
        MetricsLog("unused.jsonl", tracking=["wandb"])
    with pytest.raises(ConfigError, match=r"train\.tracking: 'mlflow' is not a tracker; choose from 'tensorboard'"):
        tracking.check_trackers(["mlflow"])
    tracking.check_trackers([])


def test_the_trackers_are_the_configs():
    from rlhfkit.pipeline.config import TRACKERS

    assert tuple(tracking.PACKAGES) == TRACKERS == tuple(tracking.OPENERS)


def test_importing_the_metrics_log_imports_no_tracker():
    code = ("import sys, rlhfkit.core.runio; "
            "print(sorted(m for m in ('tensorboard', 'wandb', 'trackio', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_wandb_offline_writes_its_run_in_the_stage_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "config",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    # Two logs open at once (a self-training round's inside its stage's): each its own run.
    outer = MetricsLog(tmp_path / "rest" / "metrics.jsonl", tracking=["wandb"])
    outer.log({"step": 1, "objective/scores": 0.5})
    inner = MetricsLog(tmp_path / "rest" / "round_1" / "metrics.jsonl", tracking=["wandb"])
    inner.log({"step": 1, "loss/sft": 2.0})
    outer.log({"step": 2, "objective/scores": 0.75})
    inner.close()
    outer.close()

    for stage, metric in (("rest", b"objective/scores"), ("rest/round_1", b"loss/sft")):
        runs = list((tmp_path / stage / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        # The metric's name, as metrics.jsonl has it. wandb's service process writes the run file on its own
        # after finish() returns (within milliseconds; before the process exits), hence the wait.
        deadline = time.monotonic() + 5
        while metric not in runs[0].read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric in runs[0].read_bytes()


def test_trackio_logs_each_stage_as_a_run(tmp_path_factory, monkeypatch):
    store = tmp_path_factory.mktemp("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(store))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage
    from trackio.utils import TRACKIO_DIR

    if TRACKIO_DIR != store:
        pytest.skip("trackio was imported earlier in this process, with another TRACKIO_DIR")
    stage = tmp_path_factory.mktemp("out") / "dpo"
    write(stage / "metrics.jsonl", RECORDS, tracking=["trackio"])

    logs = SQLiteStorage.get_logs(tracking.PROJECT, "dpo")
    assert [(line["step"], line["loss/sft"]) for line in logs] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert all("sample" not in line and "eval/loss" not in line for line in logs)


def test_pipeline_stage_logs_to_tensorboard(tmp_path):
    """train.tracking = ["tensorboard"] in a run: the SFT stage's event file holds what its metrics.jsonl holds, and
    the periodic held-out evaluation (train.eval_every) too; a missing tracker package is refused before anything."""
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    cfg = load_config(overrides=["sft.n_demos=256", "sft.epochs=1", "sft.batch_size=16", "device='cpu'",
                                 "train.tracking=['tensorboard']", "train.eval_every=5"])
    run_stage("sft", cfg, tmp_path)
    logged = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    board = tensorboard_scalars(tmp_path / "sft" / "tensorboard")
    for name in ("loss/sft", "lr", "eval/loss/sft"):
        expected = [(r["step"], r[name]) for r in logged if name in r]
        assert expected and [(s, pytest.approx(v)) for s, v in expected] == board[name]
    tracking.configure_tracking([])


def test_missing_tracker_refused_before_the_run(tmp_path, monkeypatch):
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(overrides=["sft.n_demos=256", "sft.epochs=1", "train.tracking=['wandb']", "device='cpu'"])
    with pytest.raises(ConfigError, match=r"train.tracking.*pip install"):
        run_stage("sft", cfg, tmp_path)
    assert not (tmp_path / "sft").exists() and not (tmp_path / ".partial").exists()


def test_progress_bars_only_on_the_main_process(monkeypatch, capsys):
    """Under `accelerate launch` the other processes draw no bars (each would repeat the main one's)."""
    from rlhfkit.core.runio import progress

    monkeypatch.setenv("RANK", "1")
    bar = progress(3, "quiet")
    bar.update(3)
    bar.close()
    assert bar.disable and "quiet" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    shown = progress(3, "shown")
    assert not shown.disable
    shown.close()
