"""The Python surface (rlhfkit/pipeline/api.py): a model and tokenizer in memory, records as a list or a
datasets.Dataset, config sections as dicts or dataclasses, callbacks, the trained model returned; and the outcome
of each trainer on data whose preferred behaviour is known. The online methods (grpo, rloo, ppo) from a tiny random
policy: a Python reward the policy learns in a few dozen steps, a reward model directory, both summed, a reward dict
(weights, Llama 2's rule) checked against each source's logged score; the selection methods (best-of-N, rejection
sampling, online DPO, ReST) scoring above a plain sample."""

import json
import math
import random

import pytest
import torch

import rlhfkit
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.core.runio import read_metrics
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_scalar_model
from rlhfkit.pipeline.config import SFTConfig


@pytest.fixture(scope="module")
def demos(digits):
    pairs, _ = digits.sft_split(400, random.Random(0))
    return [{"prompt": p, "completion": c} for p, c in pairs]


@pytest.fixture(scope="module")
def preferences(demos):
    """chosen: the task's completion; rejected: '0 0 0 0' (what the preferred behaviour is not)."""
    return [{"prompt": d["prompt"], "chosen": d["completion"], "rejected": "0 0 0 0"} for d in demos
            if d["completion"] != "0 0 0 0"]


def tiny(tokenizer):
    return build_tiny_policy(TinyModelSpec("llama", 2, 32, 4, 32), tokenizer, seed=0)


class Recorder:
    def __init__(self):
        self.steps, self.evals, self.saves = [], [], []

    def on_step(self, step, metrics):
        self.steps.append((step, dict(metrics)))

    def on_eval(self, step, metrics):
        self.evals.append(step)

    def on_save(self, step, path):
        self.saves.append((step, path))


def test_sft_from_objects_and_records(tmp_path, tokenizer, demos):
    """A model object and a list of records: the held-out loss falls well below the untrained model's, the
    callbacks see every step and the evaluations, and a datasets.Dataset of the same records trains the same."""
    untrained = rlhfkit.sft(tiny(tokenizer), tokenizer, demos, out=tmp_path / "zero", sft={"epochs": 0})
    rec = Recorder()
    trained = rlhfkit.sft(tiny(tokenizer), tokenizer, demos, out=tmp_path / "one", callbacks=[rec],
                          sft={"epochs": 2, "batch_size": 16, "lr": 4e-3}, train={"eval_every": 10})
    assert trained.result["heldout_loss"] < untrained.result["heldout_loss"] - 0.5
    assert [s for s, _ in rec.steps] == list(range(1, trained.result["steps"] + 1))
    assert all("loss/sft" in m for _, m in rec.steps) and rec.evals == list(range(10, trained.result["steps"], 10))
    assert isinstance(trained.model, torch.nn.Module) and (trained.out_dir / "metrics.jsonl").is_file()

    datasets = pytest.importorskip("datasets")
    again = rlhfkit.sft(tiny(tokenizer), tokenizer, datasets.Dataset.from_list(demos), out=tmp_path / "two",
                        sft=SFTConfig(epochs=2, batch_size=16, lr=4e-3))  # the section as its dataclass
    assert again.result["heldout_loss"] == trained.result["heldout_loss"]  # eval_every does not change training


def test_reward_model_and_dpo_learn_the_preference(tmp_path, tokenizer, preferences):
    start = rlhfkit.sft(tiny(tokenizer), tokenizer, [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                      for p in preferences], out=tmp_path / "sft",
                        sft={"epochs": 1, "lr": 4e-3, "batch_size": 16})
    rm = rlhfkit.reward_model(start.model, start.tokenizer, preferences, out=tmp_path / "rm",
                              reward={"epochs": 2, "batch_size": 16, "lr": 1e-3})
    assert rm.result["heldout_accuracy"] > 0.9
    with torch.no_grad():  # the returned model scores: a chosen completion above the rejected one
        ids = [start.tokenizer(f"{preferences[0]['prompt']} {c}", return_tensors="pt").input_ids
               for c in (preferences[0]["chosen"], "0 0 0 0")]
        chosen, rejected = (rm.model(input_ids=i).logits[0, 0].item() for i in ids)
    assert chosen > rejected
    aligned = rlhfkit.dpo(start.model, start.tokenizer, preferences, out=tmp_path / "dpo",
                          dpo={"epochs": 1, "batch_size": 16, "lr": 1e-3})
    assert aligned.result["initial_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
    assert aligned.result["heldout_accuracy"] > 0.9 and aligned.result["heldout_loss"] < 0.5


def test_reward_model_trains_without_dropout(tmp_path, tokenizer, preferences):
    """As TRL's RewardTrainer (disable_dropout): a model whose config asks for dropout trains exactly as the same
    model without it, and the saved reward model has none."""
    runs = []
    for p in (0.0, 0.5):
        model = tiny(tokenizer)
        model.config.attention_dropout = p  # Llama's, applied functionally in the attention while training
        rm = rlhfkit.reward_model(model, tokenizer, preferences[:160], out=tmp_path / f"p{p}",
                                  reward={"epochs": 1, "batch_size": 16, "lr": 1e-3})
        runs.append((rm.out_dir / "metrics.jsonl").read_text())
        assert rm.model.config.attention_dropout == 0.0
    assert runs[0] == runs[1]


def test_bad_input_is_named(tmp_path, tokenizer, demos):
    with pytest.raises(ConfigError, match="record 1 is a str"):
        rlhfkit.sft(tiny(tokenizer), tokenizer, [demos[0], "oops"], out=tmp_path / "a")
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing field 'completion'"):  # record 1 = line 2
        rlhfkit.sft(tiny(tokenizer), tokenizer, [demos[0], {"prompt": "1 2 3 4 ="}] + demos[2:], out=tmp_path / "b")
    with pytest.raises(ConfigError, match="tokenizer"):
        rlhfkit.sft(tiny(tokenizer), None, demos, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="sft.nope"):
        rlhfkit.sft(tiny(tokenizer), tokenizer, demos, out=tmp_path / "d", sft={"nope": 1})


class KillAt:
    def __init__(self, k):
        self.k = k

    def on_step(self, step, metrics):
        if step == self.k:
            raise KeyboardInterrupt  # what a kill leaves: the checkpoint before it, nothing after


@pytest.mark.parametrize("trainer", ["reward_model", "dpo"])
def test_reward_and_dpo_resume_exactly(tmp_path, tokenizer, preferences, trainer):
    """Killed mid-epoch after a checkpoint (train.checkpoint_every = 4, killed at step 7), the same call goes on
    from step 4 and ends with the weights and log of an uninterrupted run, bit for bit."""
    train = getattr(rlhfkit, trainer)
    section = {"reward": {"epochs": 1, "batch_size": 16}} if trainer == "reward_model" else {"dpo": {"epochs": 1, "batch_size": 16}}
    model = tiny(tokenizer)
    whole = train(model, tokenizer, preferences, out=tmp_path / "whole", train={"checkpoint_every": 4}, **section)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, preferences, out=tmp_path / "run", train={"checkpoint_every": 4},
              callbacks=[KillAt(7)], **section)
    seen = Recorder()
    resumed = train(model, tokenizer, preferences, out=tmp_path / "run", train={"checkpoint_every": 4},
                    callbacks=[seen], **section)
    assert seen.steps[0][0] == 5  # went on after the checkpoint of step 4, not from the start
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    stage = whole.out_dir.name
    assert (tmp_path / "run" / stage / "metrics.jsonl").read_text() == (tmp_path / "whole" / stage / "metrics.jsonl").read_text()
    assert whole.result["heldout_loss"] == resumed.result["heldout_loss"]


# ---------------------------------------------------------------- the online methods: grpo, rloo, ppo

def starts_with_7(prompts, completions, **kwargs):
    """1 for a completion that starts with '7': a random tiny policy's first token is '7' about 1 time in 15, and a
    few dozen steps make it the most likely (tests/test_rloo_grpo.py::test_toy_reward_rises)."""
    return [float(c.startswith("7")) for c in completions]


LEARN = {"prompts_per_step": 8, "k": 4, "minibatch_size": 16, "epochs": 2, "lr": 0.01, "beta": 0.01}
FIVE_TOKENS = {"max_new_tokens": 5}  # task = 'none' samples 64 by default; the tiny model has 32 positions


@pytest.fixture(scope="module")
def prompts(digits):
    return digits.prompts(200, random.Random(0))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    """A reward model directory as rlhfkit saves one: the tiny policy's backbone and a scalar head, the head scaled
    so that its (random) scores spread over several units and PPO has something to climb."""
    root = tmp_path_factory.mktemp("rm")
    tiny(tokenizer).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(1)
    rm = load_scalar_model(root / "policy", torch.device("cpu"), "reward model")
    with torch.no_grad():
        rm.score.weight.mul_(100.0)
    rm.save_pretrained(root / "reward" / "model")
    tokenizer.save_pretrained(root / "reward" / "model")
    return root / "reward" / "model"


def scores(trained, name="objective/scores/starts_with_7"):
    return [m[name] for m in read_metrics(trained.out_dir / "metrics.jsonl")]


def test_grpo_learns_a_python_reward_and_calls_back(tmp_path, tokenizer, prompts):
    """A function of the caller's (not importable by name) as the only reward: its share rises from ~1/15 to most
    completions, the returned model puts '7' first, the callbacks see every logged step and every checkpoint, and
    the prompts were written one {"prompt": ...} record a line."""
    rec = Recorder()
    trained = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, reward=starts_with_7, out=tmp_path, callbacks=[rec],
                           grpo={**LEARN, "total_steps": 25, "checkpoint_every": 10}, data=FIVE_TOKENS)
    got = scores(trained)
    assert sum(got[:3]) / 3 < 0.25 and sum(got[-5:]) / 5 > 0.8, got
    assert trained.result["steps"] == 25 and trained.out_dir == tmp_path / "grpo"
    assert [s for s, _ in rec.steps] == list(range(1, 26))
    assert [m for _, m in rec.steps] == read_metrics(trained.out_dir / "metrics.jsonl")  # what was logged
    assert rec.saves == [(10, trained.out_dir / "checkpoint"), (20, trained.out_dir / "checkpoint"),
                         (25, trained.out_dir / "checkpoint")]
    with torch.no_grad():  # the model returned is the trained one: '7' is its likeliest first token
        ids = tokenizer(prompts[0], return_tensors="pt").input_ids
        first = trained.model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([first]).strip() == "7"
    lines = (tmp_path / "input" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": p} for p in prompts]


def test_a_function_given_as_module_path_trains_the_same(tmp_path, tokenizer, prompts):
    """The callable registered for the call and the same function named "module:function" (as a config file would
    name it) give the same run, bit for bit: the registry changes how the function is found, nothing else. Records
    with a "prompt" are prompts as plain strings are."""
    records = [{"prompt": p, "answer": "unused"} for p in prompts]
    runs = [rlhfkit.rloo(tiny(tokenizer), tokenizer, records if i else prompts, reward=reward, out=tmp_path / str(i),
                         rloo={**LEARN, "total_steps": 4}, data=FIVE_TOKENS)
            for i, reward in enumerate([starts_with_7, f"{__name__}:starts_with_7"])]
    a, b = ((r.out_dir / "metrics.jsonl").read_text() for r in runs)
    assert a == b and "objective/scores/starts_with_7" in a
    for x, y in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(x, y)


def test_a_records_other_fields_reach_the_reward_function(tmp_path, tokenizer, prompts):
    """TRL's dataset columns: a prompt record's other fields come to the function by keyword, aligned with the
    completions (K samples of a prompt, each with its prompt's value), and are kept in OUT/input/prompts.jsonl; the
    fields that would make the file another format ("completion") are not."""
    wanted = {p: str(i % 10) for i, p in enumerate(prompts)}  # a reference answer per prompt
    records = [{"prompt": p, "first": wanted[p], "completion": "dropped"} for p in prompts]
    calls = []

    def matches_first(prompts, completions, first, **kwargs):
        calls.append((list(prompts), list(first), sorted(kwargs)))
        return [float(c.startswith(f)) for c, f in zip(completions, first)]

    trained = rlhfkit.grpo(tiny(tokenizer), tokenizer, records, reward=matches_first, out=tmp_path,
                           grpo={**LEARN, "total_steps": 2}, data=FIVE_TOKENS)
    assert len(calls) == 2  # one scoring call a step
    for batch, first, others in calls:
        assert len(batch) == LEARN["prompts_per_step"] * LEARN["k"] and first == [wanted[p] for p in batch]
        assert others == []  # no "completion", no "prompt" / "item_id"
    lines = [json.loads(line) for line in (tmp_path / "input" / "prompts.jsonl").read_text().splitlines()]
    assert lines == [{"prompt": p, "first": wanted[p]} for p in prompts]


def test_ppo_climbs_a_reward_model_directory(tmp_path, tokenizer, prompts, rm_dir):
    """A reward model directory (the value model starts from it: ppo.value_init = 'reward'), prompts from a file:
    PPO raises the reward model's score by several units."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    trained = rlhfkit.ppo(tiny(tokenizer), tokenizer, str(path), reward=rm_dir, out=tmp_path / "out", data=FIVE_TOKENS,
                          ppo={"total_steps": 20, "rollout_batch_size": 32, "minibatch_size": 16, "ppo_epochs": 2,
                               "lr": 0.01, "kl_coef": 0.01})
    got = scores(trained, "objective/scores/reward_model")
    assert sum(got[-5:]) / 5 > sum(got[:3]) / 3 + 3.0, got
    assert not (tmp_path / "out" / "input" / "prompts.jsonl").exists()  # a file is read where it is


def test_a_list_of_rewards_is_their_sum(tmp_path, tokenizer, prompts, rm_dir):
    """[the Trained rlhfkit.reward_model returns, a function]: two sources of weight 1, each logged; the score is
    their sum less the missing-EOS penalty (1 per response without EOS) at every step. PPO without a reward model
    among its rewards starts its value model from the policy."""
    rm = rlhfkit.Trained(None, None, {}, rm_dir.parent)  # what rlhfkit.reward_model returns: out_dir = OUT/reward
    trained = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, reward=[rm, starts_with_7], out=tmp_path / "sum",
                           grpo={**LEARN, "total_steps": 3}, data=FIVE_TOKENS)
    for m in read_metrics(trained.out_dir / "metrics.jsonl"):
        summed = m["objective/scores/reward_model"] + m["objective/scores/starts_with_7"] - m["objective/no_eos_rate"]
        assert m["objective/scores"] == pytest.approx(summed, abs=1e-5)
    alone = rlhfkit.ppo(tiny(tokenizer), tokenizer, prompts, reward=[starts_with_7, starts_with_7],
                        out=tmp_path / "ppo", ppo={"total_steps": 1, "rollout_batch_size": 16, "minibatch_size": 16},
                        data=FIVE_TOKENS)
    (m,) = read_metrics(alone.out_dir / "metrics.jsonl")  # the same function twice: two sources, distinct names
    assert m["objective/scores/starts_with_7"] == m["objective/scores/starts_with_7_2"]


def test_an_online_call_resumes_exactly(tmp_path, tokenizer, prompts):
    """Killed by a callback at step 5 (checkpoints every 2 steps), the same call goes on from step 4 to the weights
    and log of an uninterrupted run."""
    call = dict(reward=starts_with_7, grpo={**LEARN, "total_steps": 6, "checkpoint_every": 2}, data=FIVE_TOKENS)
    whole = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, out=tmp_path / "whole", **call)
    with pytest.raises(KeyboardInterrupt):
        rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, out=tmp_path / "run", callbacks=[KillAt(5)], **call)
    seen = Recorder()
    resumed = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, out=tmp_path / "run", callbacks=[seen], **call)
    assert [s for s, _ in seen.steps] == [5, 6] and resumed.result["resumed"]
    assert (resumed.out_dir / "metrics.jsonl").read_text() == (whole.out_dir / "metrics.jsonl").read_text()
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_conversation_prompts_reach_the_reward_as_conversations(tmp_path, chat_tokenizer):
    """Bare conversations and {"prompt": conversation} records (a chat model's prompts): sampled through the chat
    template, and the reward function is given each prompt as its list of messages, as TRL gives it."""
    convs = [[{"role": "user", "content": f"what is {i} plus {i}?"}] for i in range(30)]
    seen = []

    def longer(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [float(len(c)) for c in completions]

    model = build_tiny_policy(TinyModelSpec("llama", 2, 32, 4, 128), chat_tokenizer, seed=0)
    trained = rlhfkit.grpo(model, chat_tokenizer, convs[:15] + [{"prompt": c} for c in convs[15:]], reward=longer,
                           out=tmp_path, grpo={"total_steps": 2, "prompts_per_step": 4, "k": 2, "minibatch_size": 8},
                           data={"max_new_tokens": 8})
    assert trained.result["steps"] == 2 and len(seen) == 16 and all(p in convs for p in seen)


@pytest.mark.parametrize("kwargs, match", [
    ({"reward": 42}, r"reward: a int\. Give a reward model directory"),
    ({"reward": "no/such/dir"}, "reward: a string naming neither a directory nor a function"),
    ({"reward": []}, "reward: an empty list"),
    ({"reward": [starts_with_7, None]}, r"reward\[1\]: a NoneType"),
    ({"reward": "model"}, "save a model object first"),  # a transformers model object: give its directory
    ({"reward": "sft"}, "the policy rlhfkit.sft returned, not a reward model"),
    ({"reward": "missing.py:f"}, r"reward.sources\[0\].function = 'missing.py:f': no file"),
    ({"prompts": []}, "prompts: none given"),
    ({"prompts": [{"text": "1 2 3 4 ="}]}, r"prompts: record 0 has no 'prompt' \(its fields: 'text'\)"),
    ({"prompts": ["1 2 3 4 =", 7]}, "prompts: item 1 is a int"),
    ({"ppo": {"value_init": "reward"}}, "ppo.value_init"),  # asked for, and no reward model to start from
])
def test_bad_online_input_is_named(tmp_path, tokenizer, prompts, kwargs, match):
    kwargs = {"prompts": prompts, "reward": starts_with_7, **kwargs}
    if kwargs["reward"] == "model":
        kwargs["reward"] = tiny(tokenizer)
    elif kwargs["reward"] == "sft":
        kwargs["reward"] = rlhfkit.Trained(None, None, {}, tmp_path / "sft")
    with pytest.raises(ConfigError, match=match):
        rlhfkit.ppo(tiny(tokenizer), tokenizer, kwargs.pop("prompts"), out=tmp_path, data=FIVE_TOKENS, **kwargs)


# ---------------------------------------------------------------- reward as a dict: weights, llama2

def test_a_reward_dict_weighs_each_source(tmp_path, tokenizer, prompts, rm_dir):
    """reward={"sources": [...], "weights": [...]}: each source logged as it scored, the reward their weighted sum
    (less the missing-EOS penalty): a weight of 0 takes a source out whatever it scored, a negative one subtracts it,
    and a [[reward.sources]] table (a dict) is a source as it is, named by its own name."""
    table = {"kind": "python", "function": f"{__name__}:starts_with_7", "name": "seven"}
    trained = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, out=tmp_path, grpo={**LEARN, "total_steps": 3},
                           data=FIVE_TOKENS, reward={"sources": [rm_dir, starts_with_7, table],
                                                     "weights": [0.5, 0.0, -1.0]})
    lines = read_metrics(trained.out_dir / "metrics.jsonl")
    assert any(m["objective/scores/starts_with_7"] > 0 for m in lines)  # the weight-0 source did score something
    for m in lines:
        assert m["objective/scores/seven"] == m["objective/scores/starts_with_7"]
        weighted = 0.5 * m["objective/scores/reward_model"] - m["objective/scores/seven"] - m["objective/no_eos_rate"]
        assert m["objective/scores"] == pytest.approx(weighted, abs=1e-5)


def safety_logit(prompts, completions, **kwargs):
    """A safety score (a logit: llama2 reads it through the sigmoid): sure-safe for a completion starting with '7'."""
    return [5.0 if c.startswith("7") else -5.0 for c in completions]


def helpful_logit(prompts, completions, **kwargs):
    return [3.0] * len(completions)


@pytest.mark.parametrize("threshold", [0.5, 0.995])
def test_a_reward_dict_combines_by_llama2(tmp_path, tokenizer, prompts, threshold):
    """combine = 'llama2': a completion whose safety probability (sigmoid(5) = 0.9933 or sigmoid(-5)) is below the
    threshold gets its safety score, any other its helpfulness score (the logit of the probability: the score
    itself). With p the share that starts with '7' (from the logged safety mean), the logged reward is
    3p - 5(1 - p) at threshold 0.5, and the safety score alone at 0.995, above both probabilities."""
    trained = rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, out=tmp_path, grpo={**LEARN, "total_steps": 2},
                           data=FIVE_TOKENS, reward={"combine": "llama2", "safety": safety_logit,
                                                     "helpfulness": helpful_logit, "threshold": threshold})
    lines = read_metrics(trained.out_dir / "metrics.jsonl")
    for m in lines:
        p = (m["objective/scores/safety"] + 5.0) / 10.0  # share of completions starting with '7'
        combined = 3.0 * p - 5.0 * (1 - p) if threshold == 0.5 else m["objective/scores/safety"]
        assert m["objective/scores/helpfulness"] == 3.0
        assert m["objective/scores"] == pytest.approx(combined - m["objective/no_eos_rate"], abs=1e-4)
    assert any(m["objective/scores/safety"] > -5.0 for m in lines)  # some completion was safe: the rule mattered


# ---------------------------------------------------------------- best-of-N, rejection sampling, online DPO, ReST

def test_best_of_n_picks_above_a_plain_sample(tmp_path, tokenizer, prompts, rm_dir):
    """best-of-N trains nothing: its curve (one line per n = 1, 2, 4, 8) rises from a plain sample's mean reward-model
    score (n = 1) by more than a unit at n = 8, with the KL bound log n - (n - 1)/n; the model returned is the one
    given, and OUT/sft (a pipeline's SFT policy, in a pipeline's OUT) is left alone."""
    model = tiny(tokenizer)
    picked = rlhfkit.best_of_n(model, tokenizer, prompts, reward=rm_dir, out=tmp_path, data=FIVE_TOKENS,
                               best_of_n={"n": 8, "n_prompts": 64})
    lines = read_metrics(picked.out_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 4, 8]
    assert lines[-1]["objective/scores"] > lines[0]["objective/scores"] + 1.0, lines
    assert [m["objective/kl"] for m in lines] == pytest.approx([math.log(n) - (n - 1) / n for n in (1, 2, 4, 8)])
    assert picked.result["n"] == 8 and (picked.out_dir / "sampler.json").is_file()
    assert not (tmp_path / "sft").exists()
    for a, b in zip(model.state_dict().values(), picked.model.state_dict().values()):
        assert torch.equal(a, b)


SELECT = {"n_prompts": 64, "k": 8, "lr": 0.01, "epochs": 4, "batch_size": 16}


def test_rejection_sampling_fine_tunes_on_the_best(tmp_path, tokenizer, prompts):
    """Each round keeps each prompt's best completion when it scores at least the threshold (here: starts with '7',
    so every kept one scores 1, above its round's sampled mean) and fine-tunes on those: three rounds more than double
    the sampled share of '7' (~1/15 at first)."""
    tuned = rlhfkit.rejection_sampling(tiny(tokenizer), tokenizer, prompts, reward=starts_with_7, out=tmp_path,
                                       rejection_sampling={**SELECT, "rounds": 3, "threshold": 0.5},
                                       data={"max_new_tokens": 16})
    lines = read_metrics(tuned.out_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["selection/kept_scores"] == 1.0 > m["objective/scores"] for m in lines)
    assert lines[-1]["objective/scores"] > 2 * lines[0]["objective/scores"], lines
    assert tuned.result["rounds"] == 3 and tuned.out_dir == tmp_path / "rejection_sampling"


@pytest.mark.parametrize("method, section", [
    ("online_dpo", {"iterations": 3}),
    ("rest", {"iterations": 3, "quantiles": [0.9]}),
])
def test_online_dpo_and_rest_raise_the_reward(tmp_path, tokenizer, prompts, method, section):
    """Online DPO (pairs: each prompt's best vs worst by the reward) and ReST (fine-tuning on the samples at or above
    a quantile of the scores) from Python: the sampled share of '7' rises over the iterations."""
    tuned = getattr(rlhfkit, method)(tiny(tokenizer), tokenizer, prompts, reward=starts_with_7, out=tmp_path,
                                     data={"max_new_tokens": 16}, **{method: {**SELECT, **section}})
    got = [m["objective/scores"] for m in read_metrics(tuned.out_dir / "metrics.jsonl") if "objective/scores" in m]
    assert len(got) == 3 and got[-1] > got[0] + 0.15, got  # here: 0.07 -> 0.40 for both


@pytest.mark.parametrize("reward, match", [
    ({"sources": [starts_with_7], "weights": [1.0, 2.0]}, r"reward\['weights'\]: 2 weight\(s\) for 1 source\(s\)"),
    ({"sources": [starts_with_7], "weights": ["1"]}, r"reward\['weights'\] = \['1'\]: a list of finite numbers"),
    ({"sources": [starts_with_7], "weight": [1.0]}, r"reward\['weight'\]: not a key .*did you mean 'weights'\?"),
    ({"sources": starts_with_7, "safety_source": "x"}, r"reward\['safety_source'\].*did you mean 'safety'\?"),
    ({"sources": [starts_with_7], "combine": "max"}, r"reward\['combine'\] = 'max': choose 'sum'"),
    ({"sources": []}, r"reward\['sources'\]: none given"),
    ({"sources": [starts_with_7, 3]}, r"reward\['sources'\]\[1\]: a int"),
    ({"sources": [starts_with_7], "threshold": 0.2}, r"reward\['threshold'\]: read by combine = 'llama2' only"),
    ({"combine": "llama2", "safety": starts_with_7}, r"needs reward\['helpfulness'\]"),
    ({"combine": "llama2", "safety": starts_with_7, "helpfulness": [starts_with_7]}, r"reward\['helpfulness'\]: one"),
    ({"combine": "llama2", "safety": starts_with_7, "helpfulness": safety_logit, "threshold": 1.5},
     r"reward\['threshold'\] = 1.5: a safety probability in \(0, 1\)"),
    ({"combine": "llama2", "safety": starts_with_7, "helpfulness": safety_logit, "weights": [1.0]},
     r"reward\['weights'\]: combine = 'llama2'"),
    ({"kind": "python", "function": "m:f"}, r"one \[\[reward.sources\]\] table; give it in a list"),
    ([{"kind": "reward_model"}], r"reward\[0\]: kind = 'reward_model' with no path"),
    ([{"kind": "python", "function": f"{__name__}:starts_with_7", "nme": "x"}],
     r"unknown key 'reward.sources\[0\].nme'; did you mean 'reward.sources\[0\].name'\?"),
])
def test_bad_reward_dict_is_named(tmp_path, tokenizer, prompts, reward, match):
    with pytest.raises(ConfigError, match=match):
        rlhfkit.grpo(tiny(tokenizer), tokenizer, prompts, reward=reward, out=tmp_path, data=FIVE_TOKENS)


def test_a_method_that_calls_no_callback_refuses_one(tmp_path, tokenizer, prompts):
    with pytest.raises(ConfigError, match=r"callbacks: rlhfkit.rejection_sampling calls none .*"
                                          r"OUT/rejection_sampling/metrics.jsonl"):
        rlhfkit.rejection_sampling(tiny(tokenizer), tokenizer, prompts, reward=starts_with_7, out=tmp_path,
                                   callbacks=[Recorder()])
    assert not (tmp_path / "input").exists()  # said before anything is written
