"""SL-CAI as a method (rlhfkit/algorithms/sl_cai.py): the SFT policy's critique -> revision chains under the
constitution, then SFT on the revisions and helpful demonstrations. The chains themselves are checked against a
manual loop in tests/test_constitution.py; here: the stage's outcome (the policy learned its own revisions: their
NLL fell), what it writes, which helpful demonstrations it mixes in, and the refusal of a policy without a chat
template before anything runs."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.algorithms.sl_cai import copied_example_share, helpful_demonstrations
from rlhfkit.core.errors import ConfigError
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_policy
from rlhfkit.pipeline.compare import compare_methods
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import pipeline_stages, run_stage
from rlhfkit.spine.constitution import Chain, Step, load_constitution, read_chains


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory, chat_tokenizer):
    path = tmp_path_factory.mktemp("chat-policy")
    build_tiny_policy(TinyModelSpec("llama", 2, 32, 4, 1024), chat_tokenizer, seed=0).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def test_sl_cai_fine_tunes_the_policy_on_its_own_revisions(chat_policy, tmp_path):
    overrides = ["method='sl_cai'", f"policy.path='{chat_policy}'", "sft.n_demos=64", "sft.epochs=1",
                 "sft.batch_size=16", "sl_cai.n_prompts=8", "sl_cai.n_helpful=8", "sl_cai.max_new_tokens=6",
                 "sl_cai.few_shot=false", "sl_cai.epochs=4", "sl_cai.batch_size=8", "sl_cai.lr=1e-2",
                 "device='cpu'", "threads=1"]
    cfg = load_config(overrides=overrides)
    assert pipeline_stages(cfg) == ["sft", "sl_cai", "eval"]
    out = tmp_path / "out"
    run_stage("sft", cfg, out)
    result = run_stage("sl_cai", cfg, out)
    chains = read_chains(out / "sl_cai" / "chains.jsonl")
    names = {p.name for p in load_constitution().principles}
    assert len(chains) == result["n_chains"] == 8 and result["n_helpful"] == 8
    assert all(len(c.steps) == 1 and c.steps[0].principle in names for c in chains)
    assert result["revision_nll_after"] < result["revision_nll_before"] - 0.5  # it learned its own revisions
    assert (out / "sl_cai" / "model" / "config.json").is_file()
    assert result["steps"] == 4 * (16 // 8)  # 8 revisions + 8 helpful demonstrations, 4 epochs of 2 steps
    ev = run_stage("eval", load_config(overrides=overrides + ["eval.n_prompts=16", "eval.dist_samples=8"]), out)
    assert ev["sl_cai"]["kl"] > 0
    report = (out / "eval" / "report.md").read_text()  # the chains, shown: the first five in full
    assert "## Critique → revision chains" in report and "8 chains in `sl_cai/chains.jsonl`" in report
    assert report.count("**Chain ") == 5 and f"critique 1 (`{chains[0].steps[0].principle}`)" in report

    # the RL stage of Constitutional AI starts from the SL-CAI policy: sft.epochs = 0 takes policy.path as it is
    rl = tmp_path / "rl"
    start = load_config(overrides=[f"policy.path='{out / 'sl_cai' / 'model'}'", "sft.epochs=0", "sft.n_demos=64",
                                   "device='cpu'", "threads=1"])
    sft = run_stage("sft", start, rl)
    assert sft["steps"] == 0 and sft["heldout_loss"] > 0
    kept = AutoModelForCausalLM.from_pretrained(rl / "sft" / "model").state_dict()
    slcai = AutoModelForCausalLM.from_pretrained(out / "sl_cai" / "model").state_dict()
    assert all(torch.equal(kept[k], slcai[k]) for k in slcai)
    with pytest.raises(ConfigError, match="sft.epochs"):
        load_config(overrides=["sft.epochs=0"])  # no policy.path: nothing to start from


def test_the_rl_stage_starts_from_an_sl_cai_adapter(chat_policy, tmp_path):
    """SL-CAI with LoRA saves an adapter (OUT/sl_cai/model); policy.path may name it with sft.epochs = 0: the
    preflight reads its base's positions, and the SFT stage is the adapter merged into its base."""
    overrides = ["method='sl_cai'", f"policy.path='{chat_policy}'", "sft.n_demos=64", "sft.epochs=1", "sft.batch_size=16",
                 "sl_cai.n_prompts=4", "sl_cai.n_helpful=4", "sl_cai.max_new_tokens=4", "sl_cai.few_shot=false",
                 "sl_cai.epochs=1", "sl_cai.batch_size=8", "lora.r=4", "device='cpu'", "threads=1"]
    out = tmp_path / "out"
    run_stage("sft", load_config(overrides=overrides), out)
    run_stage("sl_cai", load_config(overrides=overrides), out)
    adapter = out / "sl_cai" / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file()
    start = load_config(overrides=[f"policy.path='{adapter}'", "sft.epochs=0", "sft.n_demos=64", "device='cpu'",
                                   "threads=1"])
    assert run_stage("sft", start, tmp_path / "rl")["steps"] == 0
    merged = load_policy(adapter, torch.device("cpu")).state_dict()
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "sft" / "model").state_dict()
    assert all(torch.allclose(kept[k], merged[k]) for k in merged)


def test_copied_example_share_counts_revisions_that_are_an_examples_word_for_word():
    constitution = load_constitution()
    copied = constitution.examples[0].revision
    chains = [Chain("p", "r", (Step("harm", "c", rev),)) for rev in
              [copied, "  " + copied.replace(" ", "\n ") + " ", copied[:-1], "my own revision"]]
    assert copied_example_share(chains, constitution) == pytest.approx(2 / 4)  # whitespace aside; a cut one is not


def test_a_policy_without_a_chat_template_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="chat template"):
        run_stage("sl_cai", load_config(overrides=["method='sl_cai'", "device='cpu'"]), tmp_path / "out")
    assert not (tmp_path / "out" / "sl_cai").exists()


class Task:
    """A task whose gold score is the completion's length; demonstrations drawn in a known order."""

    def demonstrations(self, n, rng):
        return [(f"p{i}", "x" * rng.randrange(1, 50)) for i in range(n)]

    def gold_score(self, prompt, completion):
        return len(completion)


def test_helpful_demonstrations_are_the_best_of_four_times_as_many_by_gold():
    drawn = Task().demonstrations(12, random.Random(0))
    best = helpful_demonstrations(Task(), 3, random.Random(0), gold=True)
    assert best == sorted(drawn, key=lambda d: -len(d[1]))[:3]
    assert helpful_demonstrations(Task(), 3, random.Random(0), gold=False) == drawn[:3]
    assert helpful_demonstrations(Task(), 0, random.Random(0), gold=True) == []


def test_compare_runs_sl_cai_only_when_named():
    assert "sl_cai" not in compare_methods(load_config(overrides=[]))
    assert compare_methods(load_config(overrides=["compare.methods=['sl_cai', 'ppo']"])) == ["sl_cai", "ppo"]
