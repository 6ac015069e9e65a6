"""The Python surface (rlhfkit/pipeline/api.py): a model and tokenizer in memory, records as a list or a
datasets.Dataset, config sections as dicts or dataclasses, callbacks, the trained model returned; and the outcome
of each trainer on data whose preferred behaviour is known."""

import random

import pytest
import torch

import rlhfkit
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
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
        self.steps, self.evals = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, dict(metrics)))

    def on_eval(self, step, metrics):
        self.evals.append(step)




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
