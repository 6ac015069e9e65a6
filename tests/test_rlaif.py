"""RLAIF: the AI labeler in the feedback stage (feedback.labeler = 'ai'), soft labels through the data contract, and
the reward model's cross-entropy to them (distilled RLAIF, reward.soft_labels).

Oracles: the soft Bradley-Terry loss against its closed form and its minimiser sigma(d) = t (catches a dropped
(1 - t) term, a sign, a swapped target); the stage's soft labels against the judge called directly on the same
pairs (catches a flipped orientation, a lost swap, a wrong pair); its alignment figure against one recomputed from
the comparisons and the gold scorer; the loss's targets against the comparisons' soft labels (through a spy).
"""

import dataclasses
import json
import math
import shutil
import tomllib
from itertools import combinations

import pytest
import torch
from test_judge import TEMPLATE, _sharp_judge_dir

from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.reward import gold_ordered
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.data.contract import Comparison, read_comparisons, read_rankings, write_jsonl
from rlhfkit.evaluation.evaluate import evaluate_run, judge_head_to_head, win_outcome
from rlhfkit.feedback.ai import drawn_principles, item_pairs, principle_templates, soft_comparison, soft_ranking
from rlhfkit.models.judge import (
    DEFAULT_TEMPLATE,
    Judgement,
    LocalJudge,
    alignment,
    for_principle,
    judge_pairs,
    load_template,
    same_answer_format,
    template_from_dict,
)
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import bradley_terry_loss
from rlhfkit.pipeline.compare import compare_judges, head_to_head, tally
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import pipeline_stages, run_stage, stage_inputs
from rlhfkit.spine.constitution import DEFAULT_CONSTITUTION, load_constitution
from rlhfkit.spine.judging import judge_template
from rlhfkit.tasks import get_task

CPU = Runtime(torch.device("cpu"), None)
MICRO = ["sft.n_demos=640", "sft.epochs=1", "feedback.n_prompts=60", "reward.epochs=1", "reward.batch_size=16",
         "device='cpu'", "threads=1"]


# ----------------------------------------------------------------------------------------------------
# The soft Bradley-Terry loss


def test_soft_bradley_terry_loss_is_the_cross_entropy_to_the_soft_label():
    c, r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    t = torch.tensor([0.9, 0.6, 0.75])
    m = torch.tensor([0.2, 0.0, 0.1])
    loss, _ = bradley_terry_loss(c, r, m, t)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = [-(ti * math.log(sig(ci - ri - mi)) + (1 - ti) * math.log(1 - sig(ci - ri - mi)))
                for ci, ri, mi, ti in zip(c.tolist(), r.tolist(), m.tolist(), t.tolist())]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # a hard label (t = 1) is the plain loss; the loss is symmetric under swapping the pair and t -> 1 - t
    assert bradley_terry_loss(c, r, m, torch.ones(3))[0].item() == pytest.approx(bradley_terry_loss(c, r, m)[0].item())
    assert bradley_terry_loss(r, c, -m, 1 - t)[0].item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("t", [0.55, 0.7, 0.95])
def test_soft_bradley_terry_loss_is_minimised_where_the_model_agrees_with_the_soft_label(t):
    """Fitting free scores to one soft label ends at sigma(r_c - r_r) = t, not at certainty."""
    d = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([d], lr=0.5, max_iter=200)

    def closure():
        opt.zero_grad()
        loss, _ = bradley_terry_loss(d, torch.zeros(1), target=torch.tensor([t]))
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.sigmoid(d).item() == pytest.approx(t, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# Soft labels in the data contract


def test_soft_labels_and_rationales_round_trip_and_are_omitted_when_absent(tmp_path):
    soft = Comparison("i1", "p", "a", "b", labeler_ids=["ai-judge"], soft_label=0.8, rationale="a is polite",
                      principle="harm")
    hard = Comparison("i2", "p", "a", "b")
    write_jsonl(tmp_path / "c.jsonl", [soft, hard])
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert rows[0]["soft_label"] == 0.8 and rows[0]["rationale"] == "a is polite" and rows[0]["principle"] == "harm"
    assert not {"soft_label", "rationale", "principle"} & set(rows[1])  # files without them are as before
    assert read_comparisons(tmp_path / "c.jsonl") == [soft, hard]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[1], "principle": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'principle'"):
        read_comparisons(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("value", [0.3, 1.2, "0.8", True])
def test_a_soft_label_out_of_range_or_of_the_wrong_type_names_the_file_and_line(tmp_path, value):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"item_id": "i", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"item_id": "i", "prompt": "p", "chosen": "a", "rejected": "b", "soft_label": value}))
    with pytest.raises(DataError, match=rf"{path}:2: field 'soft_label'"):
        read_comparisons(path)


# ----------------------------------------------------------------------------------------------------
# Pairs, soft comparisons, rankings


def test_item_pairs_judge_each_distinct_text_once():
    assert item_pairs(["a", "b", "a", "c"]) == [(0, 1), (0, 3), (1, 3)]
    assert item_pairs(["a", "a"]) == []


@pytest.mark.parametrize("p, chosen, label", [(0.8, "a", 0.8), (0.3, "b", 0.7), (0.5, "a", 0.5)])
def test_a_soft_comparison_chooses_the_preferred_reply(p, chosen, label):
    c = soft_comparison("i", "q", "a", "b", Judgement(p, p, 1 - p, "ab", "ba"), "overall")
    assert c.chosen == chosen and c.rejected == ("b" if chosen == "a" else "a")
    assert c.soft_label == pytest.approx(label) and c.rationale == "ab\n---\nba" and c.labeler_ids == ["ai-judge"]


def test_a_soft_ranking_orders_by_mean_probability_of_winning_and_ties_identical_texts():
    # c beats a (0.9) and b (0.8); a beats b (0.6); the repeated "a" ties with the first
    wins = {(0, 1): 0.6, (0, 3): 0.1, (1, 3): 0.2}
    assert soft_ranking(["a", "b", "a", "c"], wins) == [[3], [0, 2], [1]]


def test_gold_ordered_puts_the_gold_better_reply_first_and_drops_gold_ties():
    gold = lambda prompt, c, criterion: {"good": 2.0, "ok": 1.0, "ok2": 1.0}[c]  # noqa: E731
    cs = [Comparison("1", "p", "ok", "good", soft_label=0.9), Comparison("2", "p", "good", "ok"),
          Comparison("3", "p", "ok", "ok2")]
    out = gold_ordered(cs, gold)
    assert [(c.chosen, c.rejected, c.soft_label) for c in out] == [("good", "ok", None), ("good", "ok", None)]


# ----------------------------------------------------------------------------------------------------
# The feedback stage with the AI judge, and the reward model on its soft labels


@pytest.fixture(scope="module")
def judge_setup(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("rlaif")
    judge = _sharp_judge_dir(root / "judge", chat_tokenizer, "llama")
    template = root / "judge.toml"
    template.write_text(TEMPLATE)
    sft_out = root / "sft_out"
    run_stage("sft", load_config(overrides=MICRO), sft_out)
    return judge, template, sft_out


def _ai(judge, template, *extra):
    return MICRO + ["feedback.labeler='ai'", f"judge.path='{judge}'", f"judge.template='{template}'", *extra]


def test_the_ai_labeler_labels_every_pair_with_the_judges_soft_label(judge_setup, tmp_path):
    judge, template, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    cfg = load_config(overrides=_ai(judge, template))
    result = run_stage("feedback", cfg, out)
    comparisons = read_comparisons(out / "feedback" / "comparisons.jsonl")
    rankings = read_rankings(out / "feedback" / "rankings.jsonl")
    assert len(rankings) == 60 and {r.labeler_id for r in rankings} == {"ai-judge"}
    n_pairs = sum(len(item_pairs(r.completions)) for r in rankings)
    assert len(comparisons) == result["n_comparisons"] == n_pairs > 100
    assert all(0.5 <= c.soft_label <= 1.0 and c.rationale is None for c in comparisons)
    assert result["judge_inputs"] == 2 * n_pairs and result["judge_cached"] == 0  # both orders, none cached

    # the soft labels are the judge's own verdicts on those pairs, both orders averaged
    direct = LocalJudge(judge, load_template(template))
    sample = comparisons[:12]
    verdicts = direct.judge([c.prompt for c in sample], [c.chosen for c in sample], [c.rejected for c in sample])
    assert [c.soft_label for c in sample] == pytest.approx([v.p for v in verdicts], abs=1e-5)
    assert len({round(c.soft_label, 3) for c in comparisons}) > 10  # the judge's probabilities, not hard labels

    # alignment with the gold labels, recomputed from the comparisons
    task = get_task("digits")
    told = [c for c in comparisons if task.gold_score(c.prompt, c.chosen) != task.gold_score(c.prompt, c.rejected)]
    fake = [Judgement(c.soft_label, c.soft_label) for c in told]
    assert result["judge_alignment_with_gold"] == pytest.approx(
        alignment(fake, [task.gold_score(c.prompt, c.chosen) > task.gold_score(c.prompt, c.rejected) for c in told]))
    assert result["n_gold_pairs"] == len(told) and 0.0 <= result["judge_position_bias"] <= 1.0

    # the same items as the simulated labelers get for this seed
    sim = tmp_path / "sim"
    shutil.copytree(sft_out, sim)
    run_stage("feedback", load_config(overrides=MICRO), sim)
    assert [r.completions for r in rankings] == [r.completions for r in read_rankings(
        sim / "feedback" / "rankings.jsonl")][::3]  # three simulated labelers rank each item

    # a rerun judges nothing: every judgement is read from OUT/judge_cache.sqlite
    again = run_stage("feedback", cfg, out, fresh=True)
    assert again["judge_calls"] == 0 and again["judge_cached"] == 2 * n_pairs
    assert read_comparisons(out / "feedback" / "comparisons.jsonl") == comparisons


def test_the_reward_model_trains_on_the_soft_labels_and_is_measured_against_gold(judge_setup, tmp_path, monkeypatch):
    judge, template, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=_ai(judge, template)), out)
    soft = torch.tensor([c.soft_label for c in read_comparisons(out / "feedback" / "comparisons.jsonl")])
    seen = []
    real_loss = reward_module.bradley_terry_loss

    def spy(chosen, rejected, margin=None, target=None):
        if margin is not None:  # training steps (the evaluation passes none)
            seen.append(target)
        return real_loss(chosen, rejected, margin, target)

    monkeypatch.setattr(reward_module, "bradley_terry_loss", spy)
    result = run_stage("reward", load_config(overrides=_ai(judge, template)), out)
    assert result["soft_labels"] is True and len(seen) == result["steps"]
    used = torch.cat(seen)  # each target one of the comparisons' soft labels (as float32)
    assert (used[:, None] - soft[None, :]).abs().min(dim=1).values.max() < 1e-6 and used.min() < 0.9
    assert 0.0 <= result["heldout_gold_accuracy"] <= 1.0 and result["n_heldout_gold"] > 0
    seen.clear()
    hard = run_stage("reward", load_config(overrides=_ai(judge, template, "reward.soft_labels=false")), out)
    assert hard["soft_labels"] is False and seen and all(t is None for t in seen)


@pytest.mark.parametrize("overrides, key", [
    (["feedback.labeler='ai'"], "feedback.labeler"),
    (["feedback.labeler='ai'", "judge.path='/x'", "judge.base_url='http://h/v1'", "judge.model='m'"], "judge.base_url"),
    (["feedback.labeler='ai'", "judge.base_url='http://h/v1'"], "judge.model"),
    (["task='courtesy'", "feedback.labeler='ai'", "judge.path='/x'"], "feedback.criteria"),
    (["task='courtesy'", "feedback.labeler='ai'", "judge.path='/x'", "feedback.criteria=['overall']"],
     "reward.sources[0].criterion"),
    (["eval.judge=true"], "eval.judge"),
    (["judge.batch_size=0"], "judge.batch_size"),
])
def test_impossible_judge_settings_name_the_field(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=overrides)


def test_a_missing_judge_directory_fails_before_anything_runs(judge_setup, tmp_path):
    _, template, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    with pytest.raises(Exception, match="judge.path"):
        run_stage("feedback", load_config(overrides=_ai(tmp_path / "nowhere", template)), out)
    assert not (out / "feedback").exists()


def test_the_judge_is_an_input_of_the_feedback_stage_but_its_speed_settings_are_not():
    base = load_config(overrides=_ai("/j", "/t.toml"))
    assert stage_inputs("feedback", base)["judge"]["path"] == "/j"
    faster = load_config(overrides=_ai("/j", "/t.toml", "judge.batch_size=64", "judge.cache='/c.sqlite'"))
    assert stage_inputs("feedback", faster) == stage_inputs("feedback", base)
    other = load_config(overrides=_ai("/j", "/t.toml", "judge.swap=false"))
    assert stage_inputs("feedback", other) != stage_inputs("feedback", base)
    assert "judge" not in stage_inputs("feedback", load_config(overrides=MICRO))


# ----------------------------------------------------------------------------------------------------
# The AI judge in the evaluation and in compare


class LongerWins:
    """A fake judge (PairJudge) with a known verdict: the longer reply is better, ties at 1/2, whatever the order."""

    def first_probs(self, items, *, few_shot=True, cot=False):
        return [(1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5, "") for _, a, b in items]


def test_judge_win_rate_against_sft(judge_setup, tmp_path):
    judge, template, sft_out = judge_setup
    sft = sft_out / "sft" / "model"
    twin = tmp_path / "twin"
    shutil.copytree(sft, twin)
    cfg = load_config(overrides=MICRO + ["eval.n_prompts=40", "eval.dist_samples=4"])
    # the same weights draw the same replies: every prompt an exact tie under position swap
    ev = evaluate_run(cfg, get_task("digits"), sft, None, {"sft": sft, "twin": twin}, CPU,
                      judge=LocalJudge(judge, load_template(template)))
    assert ev["policies"]["twin"]["judge_win_rate"] == 0.5 and "judge_win_rate" not in ev["policies"]["sft"]
    # against the known verdict of a fake judge, on the replies themselves
    cfg = load_config(overrides=MICRO + ["eval.n_prompts=40", "eval.dist_samples=4", "seed=1"])
    other = tmp_path / "other"
    run_stage("sft", load_config(overrides=MICRO + ["seed=1", "sft.n_demos=64"]), other)
    ev = evaluate_run(cfg, get_task("digits"), sft, None, {"sft": sft, "other": other / "sft" / "model"}, CPU,
                      keep_completions=True, judge=LongerWins())
    mine, base = ev["completions"]["by_policy"]["other"], ev["completions"]["by_policy"]["sft"]
    expected = sum(1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(mine, base)) / 40
    assert ev["policies"]["other"]["judge_win_rate"] == pytest.approx(expected)
    assert mine != base


def test_the_ai_judge_head_to_head_tallies_like_the_score_judges():
    by = {"a": ["xx", "x", "xxx"], "b": ["x", "xx", "xxx"], "c": ["xxxx", "", "x"]}
    jc = load_config(overrides=MICRO).judge
    verdicts = judge_head_to_head(LongerWins(), jc, ["p"] * 3, by, list(combinations(by, 2)))
    rates, matches = tally({ab: [win_outcome(p) for p in ps] for ab, ps in verdicts.items()}, list(by))
    # the same as scoring each reply by its length
    assert (rates, matches) == head_to_head({n: [len(t) for t in texts] for n, texts in by.items()})
    assert rates["a"]["b"] == 0.5 and rates["c"]["a"] == pytest.approx(1 / 3)
    assert compare_judges(load_config(overrides=MICRO + ["eval.judge=true", "judge.path='/j'"]))[-1] == "ai judge"


def test_direct_rlaif_needs_no_feedback_and_no_reward_model():
    """A judge reward source (direct RLAIF) replaces the reward model: the run has no feedback or reward stage."""
    cfg = load_config(overrides=MICRO + ["method='rloo'", "reward.sources=[{kind='judge', path='/j'}]"])
    assert pipeline_stages(cfg) == ["sft", "rloo", "eval"]
    assert stage_inputs("rloo", cfg)["reward"]["sources"][0]["kind"] == "judge"
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].path"):
        load_config(overrides=MICRO + ["reward.sources=[{kind='judge'}]"])
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].template"):
        load_config(overrides=MICRO + ["reward.sources=[{kind='gold', template='/t.toml'}]"])



# ----------------------------------------------------------------------------------------------------
# Constitutional AI's feedback (RL-CAI): each pair under a drawn principle, clamped labels


PRINCIPLED = TEMPLATE.replace('question = "Q: {prompt}', 'question = "{principle} Q: {prompt}')


def test_a_principle_fills_the_question_and_nothing_else():
    template = template_from_dict(tomllib.loads(PRINCIPLED), "p.toml")
    assert template.asks_principle and not load_template().asks_principle
    asked = for_principle(template, "Which is {kinder}?")
    assert asked.question.startswith("Which is {{kinder}}? Q: {prompt}") and not asked.asks_principle
    assert (asked.labels, asked.exemplars, asked.preamble) == (template.labels, template.exemplars, template.preamble)
    with pytest.raises(ConfigError, match="no {principle}"):
        for_principle(load_template(), "Which is kinder?")
    with pytest.raises(ConfigError, match="unknown placeholder"):
        template_from_dict(tomllib.loads(PRINCIPLED.replace("{principle}", "{rule}")), "p.toml")
    with pytest.raises(ConfigError, match="labels"):
        same_answer_format(template, dataclasses.replace(asked, labels=("A", "B")))


def test_principles_are_drawn_per_pair_reproducibly():
    template = template_from_dict(tomllib.loads(PRINCIPLED), "p.toml")
    a = principle_templates(template, str(DEFAULT_CONSTITUTION), 40, seed=0)
    assert [t.question for t in a] == [t.question for t in principle_templates(template, str(DEFAULT_CONSTITUTION),
                                                                              40, seed=0)]
    assert len({t.question for t in a}) > 2  # several principles asked
    assert [t.question for t in a] != [t.question for t in principle_templates(template, str(DEFAULT_CONSTITUTION),
                                                                              40, seed=1)]
    assert principle_templates(template, "", 3, seed=0) == [None] * 3


def test_the_ai_labeler_asks_each_pair_under_its_drawn_principle_and_clamps(judge_setup, tmp_path):
    judge, _, sft_out = judge_setup
    template = tmp_path / "principled.toml"
    template.write_text(PRINCIPLED)
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    extra = [f"judge.constitution='{DEFAULT_CONSTITUTION}'", "feedback.n_prompts=20"]
    run_stage("feedback", load_config(overrides=_ai(judge, template, *extra)), out)
    comparisons = read_comparisons(out / "feedback" / "comparisons.jsonl")
    # the oracle: each pair judged directly under the principle drawn for it
    direct = LocalJudge(judge, load_template(template))
    asked = principle_templates(direct.template, str(DEFAULT_CONSTITUTION), len(comparisons), seed=0)
    want = [judge_pairs(direct, [c.prompt], [c.chosen], [c.rejected], template=t)[0].p for c, t in zip(comparisons, asked)]
    assert [c.soft_label for c in comparisons] == pytest.approx(want, abs=1e-5)
    # each comparison names the principle it was asked under (the data contract's `principle`)
    names = [n for n, _ in drawn_principles(direct.template, str(DEFAULT_CONSTITUTION), len(comparisons), seed=0)]
    assert [c.principle for c in comparisons] == names and len(set(names)) > 2
    assert set(names) <= {p.name for p in load_constitution(DEFAULT_CONSTITUTION).principles}
    # clamped into [0.4, 0.6]: the same labels, pulled in
    run_stage("feedback", load_config(overrides=_ai(judge, template, *extra, "judge.clamp=0.1")), out)
    pulled = read_comparisons(out / "feedback" / "comparisons.jsonl")
    assert [c.soft_label for c in pulled] == pytest.approx([min(c.soft_label, 0.6) for c in comparisons])
    assert max(c.soft_label for c in comparisons) > 0.6


@pytest.mark.parametrize("overrides, match", [
    (["judge.constitution='/c.toml'", "judge.template='/t.toml'", "eval.judge=true"], "eval.judge"),
    (["judge.clamp=0.5"], "judge.clamp"),
])
def test_impossible_constitution_settings_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=MICRO + ["judge.path='/j'", *overrides])


def test_a_template_and_a_constitution_must_go_together(tmp_path):
    plain = load_config(overrides=MICRO + ["judge.path='/j'", f"judge.constitution='{DEFAULT_CONSTITUTION}'",
                                           f"judge.template='{DEFAULT_TEMPLATE}'"]).judge
    with pytest.raises(ConfigError, match="no {principle}"):
        judge_template(plain)
    (tmp_path / "p.toml").write_text(PRINCIPLED)
    lonely = load_config(overrides=MICRO + ["judge.path='/j'", f"judge.template='{tmp_path / 'p.toml'}'"]).judge
    with pytest.raises(ConfigError, match="judge.constitution"):
        judge_template(lonely)
    default = load_config(overrides=MICRO + ["judge.path='/j'", f"judge.constitution='{DEFAULT_CONSTITUTION}'"]).judge
    assert judge_template(default).asks_principle  # the constitutional template by default


def test_chain_of_thought_rationales_are_kept_with_each_comparison(judge_setup, tmp_path):
    judge, template, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=_ai(judge, template, "judge.cot=true", "feedback.n_prompts=6")), out)
    comparisons = read_comparisons(out / "feedback" / "comparisons.jsonl")
    direct = LocalJudge(judge, load_template(template))
    for c in comparisons[:4]:
        v = direct.judge([c.prompt], [c.chosen], [c.rejected], cot=True)[0]
        # both orders' rationales, the chosen-first order first when the judge preferred the first-listed pair member
        assert set(c.rationale.split("\n---\n")) == {v.rationale_ab, v.rationale_ba} and v.rationale_ab
        assert c.soft_label == pytest.approx(max(v.p, 1 - v.p), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# One reward model on two files' comparisons (reward.mix_data: RL-CAI's AI harmlessness + human helpfulness labels)


def test_mixed_comparisons_train_the_same_reward_model_and_are_measured_apart(judge_setup, tmp_path, monkeypatch):
    _, _, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=MICRO), out)
    own = read_comparisons(out / "feedback" / "comparisons.jsonl")
    # the oracle: the same pairs the other way round, under another criterion, with the same items (so the same
    # held-out items): on every held-out pair exactly one of the two files' labels is right
    mix = tmp_path / "helpful.jsonl"
    write_jsonl(mix, [dataclasses.replace(c, chosen=c.rejected, rejected=c.chosen, criterion="helpful") for c in own])
    seen = []
    real_encode = reward_module.encode_comparisons

    def spy(tokenizer, comparisons, decoder=True):
        seen.append(comparisons)
        return real_encode(tokenizer, comparisons, decoder)

    monkeypatch.setattr(reward_module, "encode_comparisons", spy)
    alone = run_stage("reward", load_config(overrides=MICRO), out)
    seen.clear()
    mixed = run_stage("reward", load_config(overrides=MICRO + [f"reward.mix_data='{mix}'"]), out)
    assert mixed["n_train_mix"] == alone["n_train"] and mixed["n_train"] == 2 * alone["n_train"]
    assert mixed["n_heldout_mix"] == alone["n_heldout"] and mixed["n_heldout"] == 2 * alone["n_heldout"]
    train = seen[0]  # the training set: the feedback's comparisons, then the mixed file's
    assert [c.criterion for c in train] == ["overall"] * alone["n_train"] + ["helpful"] * alone["n_train"]
    assert {(c.rejected, c.chosen) for c in train if c.criterion == "helpful"} == {
        (c.chosen, c.rejected) for c in train if c.criterion == "overall"}
    own_acc, mix_acc = mixed["heldout_accuracy_own"], mixed["heldout_accuracy_mix"]
    assert own_acc + mix_acc == pytest.approx(1.0)  # each part measured on its own pairs (a wrong slice breaks this)
    assert (own_acc + mix_acc) / 2 == pytest.approx(mixed["heldout_accuracy"])
    assert "heldout_accuracy_mix" not in alone and mixed["mix_data"] == str(mix)
    # the mixed file is an input of the reward model (an edit makes it stale), not of the feedback stage
    cfg = load_config(overrides=MICRO + [f"reward.mix_data='{mix}'"])
    before = stage_inputs("reward", cfg)
    mix.write_text(mix.read_text().replace("helpful", "helpful2"))
    assert stage_inputs("reward", cfg) != before
    assert stage_inputs("feedback", cfg) == stage_inputs("feedback", load_config(overrides=MICRO))
    dpo = load_config(overrides=MICRO + ["compare.methods=['ppo', 'dpo']"])  # DPO learns from the comparisons
    mixed_dpo = load_config(overrides=MICRO + ["compare.methods=['ppo', 'dpo']", f"reward.mix_data='{mix}'"])
    assert stage_inputs("dpo", mixed_dpo) == stage_inputs("dpo", dpo)


def test_a_bad_mixed_file_fails_before_anything_runs_naming_file_and_line(judge_setup, tmp_path):
    _, _, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=MICRO), out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"item_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_stage("reward", load_config(overrides=MICRO + [f"reward.mix_data='{bad}'"]), out)
    assert not (out / "reward").exists()


@pytest.mark.parametrize("overrides, key", [
    (["reward.mix_data='/m.jsonl'", "reward.loss='plackett_luce'"], "reward.mix_data"),
    (["reward.mix_data='/m.jsonl'", "reward.criterion='*'"], "reward.mix_data"),
    (["reward.mix_criterion='helpful'"], "reward.mix_criterion"),
    (["reward.mix_data='/m.jsonl'", "method='dpo'"], "no reward model is trained"),
    (["reward.mix_data='/m.jsonl'", "ppo.value_init='policy'", "reward.sources=[{kind='gold'}]"],
     "no reward model is trained"),
])
def test_impossible_mix_settings_name_the_field(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=MICRO + overrides)


# ----------------------------------------------------------------------------------------------------
# `rlhfkit judge --labels FILE`: the judge against labels people gave


def test_judge_agreement_with_labels_is_the_judges_own_verdicts_and_flips_with_the_labels(judge_setup, tmp_path):
    """Oracle: alignment recomputed from the judge called directly on the labelled pairs; the same file with every
    label reversed gives exactly 1 - alignment (ties count half both ways); per criterion; a rerun is cached."""
    from rlhfkit.pipeline.stages import judge_labels

    judge, template, sft_out = judge_setup
    out = tmp_path / "out"
    shutil.copytree(sft_out, out)
    run_stage("feedback", load_config(overrides=MICRO), out)
    labelled = read_comparisons(out / "feedback" / "comparisons.jsonl")[:40]
    labelled = [dataclasses.replace(c, criterion="helpful" if n % 4 == 0 else c.criterion)
                for n, c in enumerate(labelled)]
    people, flipped = tmp_path / "people.jsonl", tmp_path / "flipped.jsonl"
    write_jsonl(people, labelled)
    write_jsonl(flipped, [dataclasses.replace(c, chosen=c.rejected, rejected=c.chosen) for c in labelled])
    cfg = load_config(overrides=MICRO + [f"judge.path='{judge}'", f"judge.template='{template}'"])
    result = judge_labels(cfg, people, tmp_path / "j")
    direct = LocalJudge(judge, load_template(template)).judge([c.prompt for c in labelled],
                                                              [c.chosen for c in labelled],
                                                              [c.rejected for c in labelled])
    assert result["judge_alignment_with_labels"] == pytest.approx(alignment(direct, [True] * 40))
    assert 0.0 < result["judge_alignment_with_labels"] < 1.0 and result["n_comparisons"] == 40
    helpful = [v for v, c in zip(direct, labelled) if c.criterion == "helpful"]
    assert result["judge_alignment_by_criterion"]["helpful"] == pytest.approx(alignment(helpful, [True] * 10))
    judged = read_comparisons(tmp_path / "j" / "judge_agreement" / "judged.jsonl")
    assert [c.soft_label for c in judged] == pytest.approx([max(v.p, 1 - v.p) for v in direct], abs=1e-5)
    reverse = judge_labels(cfg, flipped, tmp_path / "j")  # the same pairs, the other order: all from the cache
    assert reverse["judge_alignment_with_labels"] == pytest.approx(1 - result["judge_alignment_with_labels"])
    assert reverse["judge_calls"] == 0 and reverse["judge_cached"] == 80
    assert json.loads((tmp_path / "j" / "judge_agreement" / "agreement.json").read_text())["labels"] == str(flipped)


def test_judge_agreement_refuses_bad_input_before_judging_and_leaves_nothing_half_written(judge_setup, tmp_path):
    from rlhfkit.cli import main
    from rlhfkit.pipeline.stages import judge_labels

    judge, template, _ = judge_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{\n")
    cfg = load_config(overrides=MICRO + [f"judge.path='{judge}'", f"judge.template='{template}'"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        judge_labels(cfg, bad, tmp_path / "j")
    with pytest.raises(ConfigError, match="set judge.path"):
        judge_labels(load_config(overrides=MICRO), bad, tmp_path / "j")
    assert not (tmp_path / "j" / "judge_agreement").exists()
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    args = ["judge", "--labels", str(good), "--out", str(tmp_path / "cli"), "--set", "device='cpu'",
            "--set", f"judge.path='{judge}'", "--set", f"judge.template='{template}'"]
    assert main(args) == 0 and (tmp_path / "cli" / "judge_agreement" / "agreement.json").is_file()
    assert main(["judge", "--labels", str(bad), "--out", str(tmp_path / "cli2"), "--set", f"judge.path='{judge}'"]) == 2
