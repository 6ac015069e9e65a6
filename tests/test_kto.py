"""KTO (rlhfkit/algorithms/kto.py): the mismatched pairs, the wiring of thumbs through the pipeline, the simulated
thumbs, and a tiny end-to-end run on digits whose outcome is checked (the loss itself: tests/test_preference_losses.py)."""

import json
import random
import re
from pathlib import Path

import pytest

from rlhfkit.algorithms import REGISTRY
from rlhfkit.algorithms.kto import encode_thumbs, thumbs_file
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.contract import Thumb, read_thumbs, write_jsonl
from rlhfkit.feedback.simulated import simulated_thumb
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import pipeline_stages, preflight, run_pipeline, stage_inputs, stage_needs
from rlhfkit.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ["method='kto'", "feedback.kind='thumbs'", "sft.n_demos=8000", "sft.epochs=1", "feedback.n_prompts=600",
        "kto.epochs=2", "kto.batch_size=32", "eval.n_prompts=300", "eval.dist_samples=100", "device='cpu'", "threads=1"]


def test_registered_with_its_section():
    assert "kto" in REGISTRY
    cfg = load_config(overrides=["method='kto'"])
    assert cfg.kto.loss == "kto" and cfg.kto.beta > 0


def test_mismatched_pairs_are_a_cycle_over_other_completions():
    tok = get_task("digits").build_tokenizer()
    thumbs = [Thumb(f"i{i}", f"{i} {i} {i} {i} =", f"{(i + 1) % 10} 1 2 3", i % 2 == 0) for i in range(8)]
    (ids, mask, completion_mask), labels = encode_thumbs(tok, thumbs, seed=0)
    assert ids.shape[0] == 16 and labels.tolist() == [t.label for t in thumbs]
    n = len(thumbs)

    def text(row, which):
        keep = (completion_mask[row] == 1) if which == "completion" else (mask[row] == 1) & (completion_mask[row] == 0)
        return tok.decode(ids[row][keep], skip_special_tokens=True)

    used = []
    for i in range(n):
        assert text(n + i, "prompt") == text(i, "prompt")  # row N + i: thumb i's prompt ...
        other = next(j for j in range(n) if text(j, "completion") == text(n + i, "completion"))
        assert other != i  # ... with another thumb's completion
        used.append(other)
    assert sorted(used) == list(range(n))  # every completion used once: a cycle
    again = encode_thumbs(tok, thumbs, seed=0)[0]
    assert all((a == b).all() for a, b in zip(again, (ids, mask, completion_mask)))  # same seed, same pairs


def test_simulated_thumb_noise_and_threshold():
    rng = random.Random(0)
    assert all(simulated_thumb(2.0, 0.0, 1.5, rng) for _ in range(50))
    assert not any(simulated_thumb(1.0, 0.0, 1.5, rng) for _ in range(50))
    flips = sum(not simulated_thumb(2.0, 0.2, 1.5, rng) for _ in range(4000)) / 4000  # down only when misjudged -1
    assert flips == pytest.approx(0.1, abs=0.02)


def test_thumbs_feedback_is_refused_for_methods_that_need_comparisons():
    with pytest.raises(ConfigError, match="feedback.kind"):
        load_config(overrides=["feedback.kind='thumbs'", "method='dpo'"])
    with pytest.raises(ConfigError, match="feedback.kind"):
        load_config(overrides=["feedback.kind='thumbs'"])  # PPO's reward model learns from comparisons
    with pytest.raises(ConfigError, match="feedback.kind"):
        load_config(overrides=["feedback.kind='thumbs'", "method='kto'", "feedback.labeler='human'"])
    with pytest.raises(ConfigError, match="kto.beta"):
        load_config(overrides=["method='kto'", "kto.beta=0"])
    load_config(overrides=["feedback.kind='thumbs'", "method='kto'"])


def test_wiring_feedback_or_kto_data(tmp_path):
    cfg = load_config(overrides=["method='kto'", "feedback.kind='thumbs'"])
    assert stage_needs("kto", cfg) == ("sft", "feedback")
    assert pipeline_stages(cfg) == ["sft", "feedback", "kto", "eval"]
    assert thumbs_file(cfg, tmp_path) == tmp_path / "feedback" / "thumbs.jsonl"
    assert thumbs_file(load_config(overrides=["method='kto'"]), tmp_path) == tmp_path / "feedback" / "comparisons.jsonl"
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [Thumb(f"i{i}", "1 2 3 4 =", "6 7 8 9", i % 3 == 0) for i in range(40)])
    cfg = load_config(overrides=["method='kto'", f"kto.data='{path}'"])
    assert stage_needs("kto", cfg) == ("sft",) and "feedback" not in pipeline_stages(cfg)
    before = stage_inputs("kto", cfg)["kto_data_sha256"]
    write_jsonl(path, [Thumb(f"i{i}", "1 2 3 4 =", "6 7 8 9", i % 2 == 0) for i in range(40)])
    assert stage_inputs("kto", cfg)["kto_data_sha256"] != before  # an edited file makes KTO stale
    # preference data of your own (reward.data) is what KTO reads when kto.data is empty, as DPO does: no simulated
    # feedback stage runs behind your back
    cfg = load_config(overrides=["method='kto'", f"reward.data='{path}'"])
    assert stage_needs("kto", cfg) == ("sft",) and "feedback" not in pipeline_stages(cfg)
    assert thumbs_file(cfg, tmp_path) == path and stage_inputs("kto", cfg)["kto_data_sha256"]
    other = tmp_path / "mine.jsonl"
    other.write_bytes(path.read_bytes())
    assert thumbs_file(load_config(overrides=["method='kto'", f"reward.data='{path}'", f"kto.data='{other}'"]),
                       tmp_path) == other  # kto.data first


def test_preflight_refuses_one_kind_of_thumb_before_anything_runs(tmp_path):
    path = tmp_path / "ups.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1 2 3 4 =", "completion": "6 7 8 9", "label": True,
                                        "item_id": f"i{i}"}) + "\n" for i in range(30)))
    cfg = load_config(overrides=["method='kto'", f"kto.data='{path}'"])
    with pytest.raises(DataError, match=r"ups.jsonl: all 30 thumbs of the file are up .*cannot learn from one kind"):
        preflight(cfg, tmp_path / "out", pipeline_stages(cfg))
    assert not (tmp_path / "out").exists()
    path.write_text("".join(json.dumps({"prompt": "1 2 3 4 =", "completion": "5 6 7 8", "label": i % 2 == 0,
                                        "item_id": f"i{i}"}) + "\n" for i in range(30)))
    preflight(cfg, tmp_path / "out", pipeline_stages(cfg))  # both kinds, text the digits tokenizer represents
    path.write_text(path.read_text().replace('"label": false', '"label": "no"', 1))
    with pytest.raises(DataError, match=r"ups.jsonl:2: field 'label' must be a JSON boolean"):
        preflight(cfg, tmp_path / "out", pipeline_stages(cfg))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kto") / "out"
    return out, run_pipeline(load_config(overrides=TINY), out)


def test_tiny_kto_run_learns_from_thumbs(tiny_run):
    """Starts at the reference (loss = 1/2 exactly, z0 = 0), separates the held-out thumbs, and raises the preferred
    first digit, which the thumbs up reward."""
    out, summary = tiny_run
    assert summary["kto"]["initial_loss"] == 0.5
    assert summary["kto"]["heldout_reward_margin"] > 0.5
    assert summary["feedback"]["judgements"] == 600 * 4 * 3 == len(read_thumbs(out / "feedback" / "thumbs.jsonl"))
    assert summary["eval"]["kto"]["preferred_first_rate"] > summary["eval"]["sft"]["preferred_first_rate"] + 0.2


def test_tiny_kto_metrics_are_in_the_glossary(tiny_run):
    out, _ = tiny_run
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / "kto" / "metrics.jsonl") for k in rec}
    assert {"loss/kto", "kto/kl", "rewards/chosen", "rewards/rejected"} <= logged
    assert logged - glossary == set()
    stats = json.loads((out / "feedback" / "stats.json").read_text())
    assert set(stats) - glossary - {"k", "labelers_per_item", "wall_time_s"} == set()  # the last: config and time


def test_online_reference_gives_the_cached_numbers(tiny_run, tmp_path):
    """kto.reference = 'online' (a frozen copy run every step) trains the same policy as the cached table."""
    import shutil

    from rlhfkit.pipeline.stages import run_stage

    out, summary = tiny_run
    copy = tmp_path / "online"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("kto", "eval", "summary.json", ".lock", ".cache"))
    online = run_stage("kto", load_config(overrides=TINY + ["kto.reference='online'"]), copy)
    assert online["initial_loss"] == 0.5 and online["reference_cache"] == "none"
    for key in ("heldout_loss", "heldout_reward_margin", "heldout_rewards_chosen"):
        assert online[key] == pytest.approx(summary["kto"][key], rel=1e-4, abs=1e-5), key
