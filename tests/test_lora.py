"""LoRA (rlhfkit.models.lora): the reference is the policy with its adapter disabled, on the same weights; at step 0
the LoRA policy's KL and DPO loss equal a full-copy reference's; adapter-only checkpoints resume, evaluate and
merge into a plain model directory."""

import math
import shutil

import pytest
import torch

pytest.importorskip("peft")

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.forward import forward_response
from rlhfkit.models.load import load_policy, merge_adapter
from rlhfkit.models.lora import AdapterDisabled
from rlhfkit.models.reference import policy_and_reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import DPO_LOSSES  # noqa: E402
from rlhfkit.pipeline.config import LoRAConfig

RT = Runtime(torch.device("cpu"), None)


@pytest.fixture(params=["gpt2", "llama"])
def sft_dir(request, tmp_path, tokenizer, sharp_policy):
    """A saved SFT policy with sharp (non-uniform) distributions, so a wrong reference cannot hide."""
    path = tmp_path / "sft"
    sharp_policy(request.param).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _batch(tokenizer, digits):
    import random

    from rlhfkit.data.batching import encode_prompts

    prompts = digits.prompts(6, random.Random(0))
    q, qm = encode_prompts(tokenizer, prompts)
    g = torch.Generator().manual_seed(0)
    r = torch.randint(5, 15, (6, 5), generator=g)
    rm = torch.ones_like(r)
    rm[0, 3:] = 0
    return q, qm, r, rm


def _logprobs(model, batch):
    with torch.no_grad():
        return forward_response(model, None, *batch, 1.0, RT)[0] * batch[3]


def _step(policy, batch):
    """One SGD step that raises the log-prob of the batch's responses."""
    params = [p for p in policy.parameters() if p.requires_grad]
    loss = -(forward_response(policy, None, *batch, 1.0, RT)[0] * batch[3]).sum()
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
            p.grad = None


def test_step0_equalities_and_reference_on_shared_weights(sft_dir, tokenizer, digits):
    batch = _batch(tokenizer, digits)
    full_policy, full_ref = policy_and_reference(sft_dir, LoRAConfig(r=0), RT, 0)
    policy, ref = policy_and_reference(sft_dir, LoRAConfig(r=4, alpha=8.0), RT, 0)
    assert isinstance(ref.model, AdapterDisabled) and ref.model.peft_model is policy  # no second copy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # step 0: policy == reference == the full copy, so KL = 0 exactly and DPO's loss is ln 2
    lp, ref_lp = _logprobs(policy, batch), ref.logprobs(*batch, 1.0, RT) * batch[3]
    full_lp = full_ref.logprobs(*batch, 1.0, RT) * batch[3]
    assert torch.equal(lp, ref_lp) and torch.allclose(ref_lp, full_lp, atol=1e-6)
    assert (lp - ref_lp).sum().item() == 0.0
    seq, ref_seq = lp.sum(1), ref_lp.sum(1)
    loss, _ = DPO_LOSSES["sigmoid"](seq[:3], seq[3:], ref_seq[:3], ref_seq[3:], 0.1, 0.0)
    full_seq = full_lp.sum(1)
    full_loss, _ = DPO_LOSSES["sigmoid"](full_seq[:3], full_seq[3:], full_seq[:3], full_seq[3:], 0.1, 0.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and loss.item() == pytest.approx(full_loss.item(), abs=1e-7)
    # after a step the policy moved and the reference (adapter off, same weights) did not
    _step(policy, batch)
    moved = _logprobs(policy, batch)
    assert (moved - lp).abs().max() > 1e-3
    assert torch.allclose(ref.logprobs(*batch, 1.0, RT) * batch[3], full_lp, atol=1e-6)


def test_adapter_checkpoint_resumes_evaluates_and_merges(sft_dir, tokenizer, digits, tmp_path):
    batch = _batch(tokenizer, digits)
    policy, _ = policy_and_reference(sft_dir, LoRAConfig(r=4, alpha=8.0), RT, 0)
    _step(policy, batch)
    trained = _logprobs(policy, batch)
    ckpt = tmp_path / "ckpt"
    policy.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "adapter_model.safetensors").stat().st_size < (sft_dir / "model.safetensors").stat().st_size / 4
    # resume: the same weights, still trainable, the reference still the SFT policy
    resumed, ref = policy_and_reference(sft_dir, LoRAConfig(r=4, alpha=8.0), RT, 0, resume_from=ckpt)
    assert torch.allclose(_logprobs(resumed, batch), trained, atol=1e-6)
    assert any(p.requires_grad for p in resumed.parameters())
    # evaluate: load_policy merges the adapter into its base
    assert torch.allclose(_logprobs(load_policy(ckpt, RT.device), batch), trained, atol=1e-5)
    # merge: a plain directory that no longer needs the base
    merged = merge_adapter(ckpt, tmp_path / "merged")
    from rlhfkit.cli import main

    assert main(["merge", str(ckpt), str(tmp_path / "merged-cli")]) == 0
    assert torch.allclose(_logprobs(load_policy(tmp_path / "merged-cli", RT.device), batch), trained, atol=1e-5)
    shutil.rmtree(sft_dir)
    assert torch.allclose(_logprobs(load_policy(merged, RT.device), batch), trained, atol=1e-5)
    with pytest.raises(RlhfkitError, match="trained on the base model .* not a local directory any more"):
        load_policy(ckpt, RT.device)
    with pytest.raises(RlhfkitError, match="exists"):
        merge_adapter(ckpt, merged)


def test_a_moved_run_still_finds_the_adapters_base(tokenizer, digits, tmp_path, sharp_policy):
    """The adapter records its base's absolute path; a run directory moved (or copied, or shared) elsewhere must
    still load and merge: the base is found where it stands relative to the adapter (OUT/sft/model)."""
    run = tmp_path / "run"
    sharp_policy("gpt2").save_pretrained(run / "sft" / "model")
    tokenizer.save_pretrained(run / "sft" / "model")
    batch = _batch(tokenizer, digits)
    policy, _ = policy_and_reference(run / "sft" / "model", LoRAConfig(r=4, alpha=8.0), RT, 0)
    _step(policy, batch)
    trained = _logprobs(policy, batch)
    policy.save_pretrained(run / "ppo" / "model")
    tokenizer.save_pretrained(run / "ppo" / "model")
    moved = tmp_path / "elsewhere" / "run-copy"
    moved.parent.mkdir()
    run.rename(moved)  # the recorded absolute path is gone
    assert torch.allclose(_logprobs(load_policy(moved / "ppo" / "model", RT.device), batch), trained, atol=1e-5)
    merged = merge_adapter(moved / "ppo" / "model", tmp_path / "merged")
    assert torch.allclose(_logprobs(load_policy(merged, RT.device), batch), trained, atol=1e-5)


TINY = [
    "sft.n_demos=4000", "sft.epochs=1", "feedback.n_prompts=400", "reward.epochs=2", "ppo.total_steps=4",
    "ppo.rollout_batch_size=32", "ppo.minibatch_size=16", "ppo.checkpoint_every=2", "dpo.epochs=1",
    "eval.n_prompts=100", "eval.dist_samples=50", "device='cpu'", "lora.r=4",
]


@pytest.mark.slow
def test_lora_methods_end_to_end(tmp_path):
    """PPO, DPO (cached and online reference) and rejection sampling with LoRA: each saves only its adapter,
    evaluates through it, and DPO's first loss is ln 2; DPO's online reference is the SFT policy (the adapter
    disabled), not the trained policy; a killed PPO run resumes from its adapter checkpoint to the same adapter as
    an uninterrupted one; best-of-N (which trains nothing) does not read [lora]."""
    from safetensors.torch import load_file

    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_pipeline, run_stage, stage_changes

    out = tmp_path / "out"
    summary = run_pipeline(load_config(overrides=TINY), out)
    for method in ("ppo", "dpo"):
        if method == "dpo":
            summary = run_pipeline(load_config(overrides=TINY + ["method='dpo'"]), out, update=True)
            assert summary["dpo"]["initial_loss"] == pytest.approx(math.log(2), abs=1e-6)
        model = out / method / "model"
        assert (model / "adapter_config.json").is_file() and not (model / "model.safetensors").exists()
        assert summary["eval"][method]["kl"] > 0
    cached = summary["dpo"]
    # the online reference: the same SFT log-probs as the cached table (computed from the untrained policy), while
    # the policy moved; a reference that were the trained policy itself would track it (and the loss stay ln 2)
    online = run_stage("dpo", load_config(overrides=TINY + ["method='dpo'", "dpo.reference='online'"]), out)
    assert online["reference_forwards"] > 0 and online["initial_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("heldout_ref_logps_chosen", "heldout_ref_logps_rejected"):
        assert online[key] == pytest.approx(cached[key], abs=1e-4)
    assert online["heldout_reward_margin"] > 0.005  # the policy moved away from its reference (0.031 measured)
    assert online["heldout_loss"] < math.log(2) - 0.002  # (0.679 measured; ln 2 = 0.693)
    # rejection sampling trains adapters too (lora.r means the same in every method), round by round
    rs = TINY + ["method='rejection_sampling'", "rejection_sampling.rounds=2", "rejection_sampling.n_prompts=64",
                 "rejection_sampling.epochs=1"]
    summary = run_pipeline(load_config(overrides=rs), out, update=True)
    for model in (out / "rejection_sampling" / "round-1" / "model", out / "rejection_sampling" / "model"):
        assert (model / "adapter_config.json").is_file() and not (model / "model.safetensors").exists()
    assert summary["eval"]["rejection_sampling"]["kl"] > 0
    # best-of-N trains nothing: lora.r is not one of its inputs
    bon = TINY + ["method='best_of_n'", "best_of_n.n_prompts=32", "best_of_n.n=2"]
    result = run_stage("best_of_n", load_config(overrides=bon), out)
    assert 0 < result["wall_time_s"] < 600  # the stage's own time (a loop variable once shadowed its start time)
    assert stage_changes(out, "best_of_n", load_config(overrides=bon + ["lora.r=8"])) == []
    # resume: a checkpoint at step 2, then the rest, equals the uninterrupted 4 steps
    full = load_file(out / "ppo" / "model" / "adapter_model.safetensors")
    short = tmp_path / "short"
    shutil.copytree(out, short, ignore=shutil.ignore_patterns("ppo", "dpo", "rejection_sampling", "best_of_n", "eval",
                                                              "summary.json", ".lock", ".cache"))
    run_stage("ppo", load_config(overrides=TINY + ["ppo.total_steps=2"]), short)
    run_stage("ppo", load_config(overrides=TINY), short)  # continues from the step-2 adapter checkpoint
    resumed = load_file(short / "ppo" / "model" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.slow
def test_sft_as_an_adapter_on_a_pretrained_model(tmp_path, tiny_policy_dir):
    """lora.sft: SFT trains adapters on policy.path; the stage keeps the adapter and writes the merged model,
    which every later stage starts from."""
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    cfg = load_config(overrides=["sft.n_demos=4000", "sft.epochs=1", "sft.lr=0.05", "device='cpu'", "lora.r=8", "lora.sft=true",
                                 f"policy.path='{tiny_policy_dir}'"])
    result = run_stage("sft", cfg, tmp_path / "out")
    sft = tmp_path / "out" / "sft"
    assert (sft / "adapter" / "adapter_config.json").is_file() and (sft / "model" / "model.safetensors").is_file()
    base = load_policy(tiny_policy_dir, RT.device)
    merged = load_policy(sft / "model", RT.device)
    frozen = [n for n, p in base.named_parameters() if "embed" in n or "wte" in n]  # not adapted by default
    assert frozen and all(torch.equal(dict(base.named_parameters())[n], dict(merged.named_parameters())[n]) for n in frozen)
    adapted = [n for n, p in base.named_parameters() if n not in frozen and p.dim() == 2]
    assert any(not torch.equal(dict(base.named_parameters())[n], dict(merged.named_parameters())[n]) for n in adapted)
    assert result["heldout_loss"] < math.log(15) - 0.15  # it learned (2.45): the random base is near uniform, ln 15 = 2.71
