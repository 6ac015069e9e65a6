"""PPO's critic on the policy's own body (ppo.value_init = 'shared', rlhfkit/models/value_head.py): one forward of
the policy gives the log-probs and the values, on every path (chunked head, full logits, padding-free), equal to a
row-by-row reference on each unpadded sequence, with the gradient of both reaching the body; PPO with it continues
a run exactly, saves the head in its checkpoints and exports a plain policy."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.algorithms.ppo import train_ppo
from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.core.runio import read_metrics
from rlhfkit.models import forward as forward_module
from rlhfkit.models.forward import forward_response
from rlhfkit.models.runtime import Runtime, runtime
from rlhfkit.models.value_head import ValueHead
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import run_pipeline, run_stage
from rlhfkit.tasks import task_for

CPU = Runtime(torch.device("cpu"), None)
T = 0.7  # a sampling temperature that is not 1: dropping it moves every log-prob


def row_by_row(policy, head, q, qm, r, rm):
    """The reference: each row's real tokens alone (no padding, positions 0..), the policy's log-probs at T and the
    head's value on the final hidden states (the body's last_hidden_state) at the position before each response
    token, in (B, Tr) with 0 past the response."""
    logprobs, values = torch.zeros(r.shape), torch.zeros(r.shape)
    for i in range(len(q)):
        query, response = q[i][qm[i].bool()], r[i][rm[i].bool()]
        ids = torch.cat([query, response])[None]
        hidden = policy.base_model(input_ids=ids).last_hidden_state[0]  # (L, H)
        logits = policy(input_ids=ids).logits[0] / T
        for j in range(len(response)):
            at = len(query) - 1 + j  # the position that predicts response token j
            logprobs[i, j] = torch.log_softmax(logits[at].float(), -1)[response[j]]
            values[i, j] = head(hidden[at])
    return logprobs, values


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("padding_free", [False, True])
def test_one_forward_gives_the_row_by_row_log_probs_values_and_gradients(arch, chunked, padding_free, rollout_batch,
                                                                         sharp_policy, monkeypatch):
    if not chunked:
        monkeypatch.setattr(forward_module, "use_chunked", lambda model, chunk: False)
    policy = sharp_policy(arch)
    torch.manual_seed(0)
    head = ValueHead.on(policy, std=0.3)  # sharp like the policy: a shifted position moves a value visibly
    q, qm, r, rm = rollout_batch(6, seed=3)
    rt = replace(CPU, padding_free=padding_free)
    forward_response(policy, head, q, qm, r, rm, T, rt)  # packed: the once-per-model packing check runs here
    body_calls = []
    hook = policy.base_model.register_forward_hook(lambda *a: body_calls.append(1))
    logprobs, values, entropy = forward_response(policy, head, q, qm, r, rm, T, rt, with_entropy=True)
    hook.remove()
    assert len(body_calls) == 1  # one forward of the policy's body for log-probs, entropy and values
    assert entropy is not None and (entropy * rm).sum() > 0
    want_logprobs, want_values = row_by_row(policy, head, q, qm, r, rm)
    assert torch.allclose(logprobs * rm, want_logprobs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(values * rm, want_values, rtol=1e-5, atol=1e-5)
    assert want_values[rm.bool()].std() > 0.3 and want_logprobs[rm.bool()].std() > 0.5  # values a bug would move

    def grads(lp, v):  # a PPO-like loss: both terms reach the body, the value term the head
        policy.zero_grad()
        head.zero_grad()
        ((lp * rm).sum() + 0.5 * ((v - 1.0) ** 2 * rm).sum()).backward()
        return torch.cat([p.grad.flatten() for p in [*policy.parameters(), *head.parameters()]])

    got = grads(*forward_response(policy, head, q, qm, r, rm, T, rt)[:2])
    want = grads(*row_by_row(policy, head, q, qm, r, rm))
    assert (got - want).norm() < 1e-4 * want.norm()
    value_only = grads(torch.zeros_like(want_logprobs, requires_grad=True), row_by_row(policy, head, q, qm, r, rm)[1])
    n_body = sum(p.numel() for p in policy.parameters())
    assert value_only[:n_body].norm() > 0  # the value loss trains the shared body too


def test_a_value_head_on_a_lora_policy_reads_the_adapted_body_and_trains_the_adapters(rollout_batch, sharp_policy,
                                                                                     tmp_path):
    """With LoRA the head reads the hidden states of the body with its adapters on; the value loss reaches the
    adapters (the base weights are frozen)."""
    from rlhfkit.models.lora import wrap_lora
    from rlhfkit.pipeline.config import LoRAConfig

    policy = wrap_lora(sharp_policy("gpt2"), LoRAConfig(r=4), tmp_path, seed=0)
    with torch.no_grad():  # adapters that change the output (peft starts B at 0: an identity adapter)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    torch.manual_seed(0)
    head = ValueHead.on(policy, std=0.3)
    q, qm, r, rm = rollout_batch(6, seed=3)
    logprobs, values, _ = forward_response(policy, head, q, qm, r, rm, T, CPU)
    body = policy.get_base_model().base_model  # GPT-2's transformer, its linear layers carrying the adapters
    want = torch.zeros(r.shape)
    for i in range(len(q)):
        query, response = q[i][qm[i].bool()], r[i][rm[i].bool()]
        hidden = body(input_ids=torch.cat([query, response])[None]).last_hidden_state[0]
        want[i, : len(response)] = head(hidden[len(query) - 1 : len(query) - 1 + len(response)])
    assert torch.allclose(values * rm, want, rtol=1e-5, atol=1e-5)
    with policy.disable_adapter():  # the adapters matter: without them the values differ
        assert not torch.allclose(forward_response(policy, head, q, qm, r, rm, T, CPU)[1] * rm, want, atol=1e-2)
    ((values - 1.0) ** 2 * rm).sum().backward()
    adapters = [p for name, p in policy.named_parameters() if "lora_" in name]
    assert adapters and all(p.grad is not None and p.grad.norm() > 0 for p in adapters)
    assert all(p.grad is None for name, p in policy.named_parameters() if "lora_" not in name)


def test_a_value_head_saves_and_loads_and_starts_like_a_score_head(sharp_policy, tmp_path):
    policy = sharp_policy("gpt2")
    torch.manual_seed(0)
    head = ValueHead.on(policy)
    assert head.linear.in_features == policy.config.hidden_size
    assert head.linear.weight.std().item() == pytest.approx(policy.config.initializer_range, rel=0.5)
    assert head.linear.bias.abs().max() == 0
    head.save_pretrained(tmp_path / "value")
    again = ValueHead.from_pretrained(tmp_path / "value", "cpu")
    assert torch.equal(again.linear.weight, head.linear.weight) and torch.equal(again.linear.bias, head.linear.bias)
    with pytest.raises(RlhfkitError, match="holds no value head.*value_init"):
        ValueHead.from_pretrained(tmp_path, "cpu")


MICRO = ["sft.n_demos=640", "sft.epochs=1", "feedback.n_prompts=120", "reward.epochs=1", "ppo.total_steps=2",
         "ppo.rollout_batch_size=16", "ppo.minibatch_size=8", "ppo.ppo_epochs=2", "ppo.checkpoint_every=1",
         "ppo.value_init='shared'", "eval.n_prompts=40", "eval.dist_samples=40", "device='cpu'", "threads=1"]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "out"
    run_pipeline(load_config(overrides=MICRO), out)
    return out


@pytest.mark.slow
def test_ppo_with_a_shared_value_head_continues_exactly_and_exports_a_plain_policy(shared_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shared_run, out)
    first = read_metrics(out / "ppo" / "metrics.jsonl")
    assert {"loss/value", "value/mean"} <= set(first[0]) and all(r["loss/value"] > 0 for r in first)
    assert (out / "ppo" / "checkpoint" / "value" / "value_head.safetensors").is_file()
    assert not (out / "ppo" / "checkpoint" / "value" / "config.json").exists()  # no second network
    exported = load_file(out / "ppo" / "model" / "model.safetensors")
    assert not any("linear" in k or "value" in k for k in exported)  # the policy alone, a plain causal LM
    assert json.loads((out / "ppo" / "model" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    # continue to 4 steps from the checkpoint; the same as 4 steps from the start
    assert run_pipeline(load_config(overrides=MICRO + ["ppo.total_steps=4"]), out, update=True)["ppo"]["resumed"]
    longer = tmp_path / "longer"
    shutil.copytree(shared_run, longer, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
    run_stage("ppo", load_config(overrides=MICRO + ["ppo.total_steps=4"]), longer)
    a, b = (load_file(o / "ppo" / "model" / "model.safetensors") for o in (out, longer))
    assert all(torch.equal(a[k], b[k]) for k in a), "continuing to 4 steps differs from running 4 steps"
    assert read_metrics(out / "ppo" / "metrics.jsonl") == read_metrics(longer / "ppo" / "metrics.jsonl")
    heads = [load_file(o / "ppo" / "checkpoint" / "value" / "value_head.safetensors") for o in (out, longer)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


@pytest.mark.slow
def test_a_checkpoint_resumes_only_with_the_value_init_that_wrote_it(shared_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shared_run, out)
    cfg = load_config(overrides=[*MICRO[:-5], "ppo.value_init='policy'", *MICRO[-4:]])
    with pytest.raises(ConfigError, match="written with a value head on the policy.*value_init = 'policy'"):
        train_ppo(cfg, task_for(cfg), out / "sft" / "model", out / "reward" / "model", out / "ppo", runtime(cfg))
