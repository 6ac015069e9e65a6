"""The pipeline hook: sample from a policy directory, wait for people, export; the export trains an RM."""

from __future__ import annotations

import json
import random

import pytest

from rlhfkit.data.contract import read_comparisons, read_rankings
from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.assignment import next_assignment, submit
from rlhfkit.labelapp.hook import human_feedback

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random GPT-2 policy with the digits tokenizer, saved like the SFT stage saves it."""
    from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
    from rlhfkit.tasks.digits import DigitsTask

    path = tmp_path_factory.mktemp("policy")
    tokenizer = DigitsTask().build_tokenizer()
    build_tiny_policy(TinyModelSpec("gpt2", 1, 16, 2, 64), tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def label_everything(project_dir, people=("ann", "ben")):
    """Two labelers who both rank by text order (so they agree), through the same code the API uses."""
    with db.opened(project_dir) as conn, db.transaction(conn):
        for name in people:
            project.add_person(conn, name)
    with db.opened(project_dir) as conn:
        settings = project.get_settings(conn)
        ids = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}
        n = 0
        for name in people:
            while (aid := next_assignment(conn, ids[name], settings)) is not None:
                order = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?", (aid,)).fetchone()[0])
                texts = json.loads(conn.execute(
                    "SELECT i.completions FROM items i JOIN assignments a ON a.item_id = i.id WHERE a.id = ?", (aid,)
                ).fetchone()[0])
                display = sorted(range(len(order)), key=lambda p: texts[order[p]])
                submit(conn, ids[name], settings, {"client_id": f"hook-{n:06d}", "assignment_id": aid,
                                                   "rankings": {"overall": [[p] for p in display]}})
                n += 1
    return n


def test_human_feedback_hook_end_to_end(policy_dir, tmp_path, capsys):
    from rlhfkit.tasks.digits import DigitsTask

    prompts = DigitsTask().prompts(8, random.Random(0))
    pdir = tmp_path / "project"
    kwargs = {"policy_dir": policy_dir, "prompts": prompts, "k": 3, "overlap": 2, "items_required": 8,
              "criteria": ["overall"], "seed": 0, "max_new_tokens": DigitsTask.max_new_tokens}

    assert human_feedback(pdir, **kwargs) is None  # 1. creates the project and says what to do
    said = capsys.readouterr().out
    assert f"rlhfkit label serve {pdir}" in said and "/invite/" in said and "add-labeler" in said
    with db.opened(pdir) as conn:
        items = conn.execute("SELECT prompt, completions FROM items").fetchall()
    assert [r["prompt"] for r in items] == prompts and all(len(json.loads(r["completions"])) == 3 for r in items)

    assert human_feedback(pdir, **kwargs) is None  # 2. nothing labeled yet: still waiting
    assert "0/8 items fully labeled" in capsys.readouterr().out

    assert label_everything(pdir) == 16
    out = human_feedback(pdir, **kwargs)  # 3. complete: exported in the trainers' format
    assert out is not None and (out / "export.json").is_file()
    comparisons = read_comparisons(out / "comparisons.jsonl")
    rankings = read_rankings(out / "rankings.jsonl")
    assert len(rankings) == 16 and {r.labeler_id for r in rankings} == {"ann", "ben"}
    assert all(sorted(c.labeler_ids) == ["ann", "ben"] for c in comparisons)  # both agree on every pair

    # 4. The export trains a reward model with the core trainer, no conversion.
    from rlhfkit.algorithms.reward import train_reward_model
    from rlhfkit.models.runtime import runtime
    from rlhfkit.pipeline.config import load_config

    cfg = load_config(reward={"epochs": 1, "batch_size": 8, "heldout_fraction": 0.25})
    result = train_reward_model(cfg, out / "comparisons.jsonl", policy_dir, tmp_path / "rm", runtime(cfg))
    assert result["n_train"] + result["n_heldout"] == len(comparisons)
    assert (tmp_path / "rm" / "model" / "config.json").is_file()


def test_lead_creates_a_project_from_a_policy_in_the_browser_form(policy_dir, tmp_path):
    from fastapi.testclient import TestClient

    from rlhfkit.labelapp.app import create_app
    from rlhfkit.tasks.digits import DigitsTask

    from .conftest import FAST_SCRYPT, PASSWORD, TEST_SETTINGS

    pdir = tmp_path / "p"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
    client = TestClient(create_app(pdir, TEST_SETTINGS))
    csrf = client.post("/api/session", json={"name": "lead", "password": PASSWORD}).json()["csrf_token"]
    assert "Create the labeling project" in client.get("/lead").text
    prompts = "\n".join(DigitsTask().prompts(3, random.Random(1)))
    form = {"csrf_token": csrf, "name": "digits", "criteria": "overall", "k": "2", "overlap": "1",
            "policy_dir": str(policy_dir)}
    bad = client.post("/lead/create", data=form, files={"completions": ("c.jsonl", b'{"prompt": 1}\n')})
    assert bad.status_code == 400 and "completions.jsonl:1" in bad.text and "prompt" in bad.text
    r = client.post("/lead/create", data=form, files={"prompts": ("prompts.txt", prompts.encode())})
    assert r.status_code == 200 and "0 / 3" in r.text  # redirected to the lead page: 3 items, none complete
    with db.opened(pdir) as conn:
        rows = conn.execute("SELECT prompt, completions, model_ids FROM items").fetchall()
    assert len(rows) == 3 and all(len(json.loads(r["completions"])) == 2 for r in rows)
    assert json.loads(rows[0]["model_ids"]) == [policy_dir.name] * 2


def test_human_stage_samples_with_the_runs_temperature_device_and_criteria(policy_dir, tmp_path, monkeypatch):
    """`feedback.temperature`, `device` and `feedback.criteria` reach the sampler and the project."""
    import shutil

    import rlhfkit.models.sampling
    from rlhfkit.core.runio import mark_complete, write_json
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import WaitingForLabels, run_stage, stage_inputs

    calls = []

    def fake_sampler(policy, prompts, k, **kwargs):
        calls.append(kwargs)
        return [[f"{n} {j}" for j in range(k)] for n in range(len(prompts))]

    monkeypatch.setattr(rlhfkit.models.sampling, "sample_completions", fake_sampler)
    out = tmp_path / "run"
    shutil.copytree(policy_dir, out / "sft" / "model")
    cfg = load_config(overrides=["feedback.labeler='human'", "feedback.n_prompts=3", "feedback.k=2",
                                 "feedback.temperature=0.25", "device='cpu'",
                                 'feedback.criteria=["helpfulness", "harmlessness"]', "reward.criterion='helpfulness'"])
    write_json(out / "sft" / "INPUTS.json", stage_inputs("sft", cfg))  # a hand-made SFT stage, for this config
    mark_complete(out / "sft", {})
    with pytest.raises(WaitingForLabels):
        run_stage("feedback", cfg, out)
    assert len(calls) == 1 and calls[0]["temperature"] == 0.25 and calls[0]["device"] == "cpu"
    with db.opened(out / "labeling") as conn:
        assert project.get_settings(conn).criteria == ["helpfulness", "harmlessness"]


def test_sample_items_temperature_is_real(policy_dir):
    """Near-zero temperature is greedy: the K samples of a prompt are identical (at 1.0 they differ)."""
    from rlhfkit.tasks.digits import DigitsTask

    prompts = DigitsTask().prompts(4, random.Random(0))
    kwargs = {"max_new_tokens": DigitsTask.max_new_tokens, "device": "cpu"}
    cold = project.sample_items(policy_dir, prompts, 4, temperature=1e-4, **kwargs)
    assert all(len(set(item["completions"])) == 1 for item in cold)
    warm = project.sample_items(policy_dir, prompts, 4, temperature=1.0, **kwargs)
    assert any(len(set(item["completions"])) > 1 for item in warm)


def test_a_policy_without_weights_is_a_clear_error(policy_dir, tmp_path, capsys):
    """CLI: one line and exit 2; the browser form: a 400 page. Not transformers' traceback."""
    import shutil

    from fastapi.testclient import TestClient

    from rlhfkit.labelapp.app import create_app
    from rlhfkit.labelapp.cli import main

    from .conftest import FAST_SCRYPT, PASSWORD, TEST_SETTINGS

    bare = tmp_path / "bare"
    shutil.copytree(policy_dir, bare)
    for weights in [*bare.glob("*.safetensors"), *bare.glob("*.bin")]:
        weights.unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3\n4 5 6\n")
    assert main(["create", str(tmp_path / "p"), "--policy", str(bare), "--prompts", str(prompts), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "weights" in err

    pdir = tmp_path / "web"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
    client = TestClient(create_app(pdir, TEST_SETTINGS))
    csrf = client.post("/api/session", json={"name": "lead", "password": PASSWORD}).json()["csrf_token"]
    r = client.post("/lead/create", data={"csrf_token": csrf, "name": "d", "criteria": "overall", "k": "2",
                                          "policy_dir": str(bare)}, files={"prompts": ("p.txt", b"1 2 3\n")})
    assert r.status_code == 400 and "weights" in r.text
