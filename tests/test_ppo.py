"""PPO's composition, checked on fixed batches against independently written references (fast: seconds).

The digits preference sits on the first response token, so an end-to-end run cannot see a misplaced score,
an ignored critic, a flipped EOS penalty or missing whitening; these tests can.
"""

import math
from dataclasses import replace

import pytest
import torch

from rlhfkit.algorithms.ppo import PPOConfig, ppo_targets, train_ppo
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.batching import encode_prompts
from rlhfkit.models.forward import disable_dropout, forward_response, token_scalars
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_scalar_model
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import Samples, decode_responses
from rlhfkit.ops.advantages import RunningMoments
from rlhfkit.pipeline.config import load_config

CPU = Runtime(torch.device("cpu"), None)


# ---------------------------------------------------------------- phases 2-5 against a loop reference

def reference_targets(raw_scores, ended, logprobs, ref_logprobs, values, lengths, pc: PPOConfig, beta: float):
    """Written from the equations, one row and one token at a time, sharing no code with rlhfkit.ops:
    score_b = RM score - penalty * [no EOS];  r_t = -beta * KL_t, plus score_b at the last response token;
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0);  A_t = delta_t + gamma lam A_{t+1};
    returns = A + V;  advantages whitened over all response tokens (mean 0, unbiased std 1)."""
    B, T = logprobs.shape
    rewards, adv, ret = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        n = lengths[b]
        score = raw_scores[b].item() - (0.0 if ended[b] else pc.missing_eos_penalty)
        for t in range(n):
            lr = logprobs[b, t].item() - ref_logprobs[b, t].item()
            kl = {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) - 1 + lr}[pc.kl_estimator]
            rewards[b, t] = -beta * kl + (score if t == n - 1 else 0.0)
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            running = rewards[b, t].item() + pc.gamma * next_v - values[b, t].item() + pc.gamma * pc.lam * running
            adv[b, t] = running
            ret[b, t] = running + values[b, t].item()
    if pc.whiten_advantages:
        flat = [adv[b, t].item() for b in range(B) for t in range(lengths[b])]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
        for b in range(B):
            for t in range(lengths[b]):
                adv[b, t] = (adv[b, t] - mean) / std
    return rewards, adv, ret


def fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 5, 1, 4, 3]  # rows 0 and 2 hit the budget (no EOS); the rest ended with EOS
    B, T = len(lengths), 5
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    ended = torch.tensor([n < T for n in lengths])
    garbage = (1 - mask) * 7.0  # values outside the mask must never matter
    logprobs = -torch.rand(B, T, generator=g) * 2 + garbage
    ref_logprobs = -torch.rand(B, T, generator=g) * 2 - garbage
    values = torch.randn(B, T, generator=g) + garbage  # a critic with opinions: values matter
    raw_scores = torch.randn(B, generator=g) * 2
    return raw_scores, ended, logprobs, ref_logprobs, values, mask, lengths


@pytest.mark.parametrize("overrides", [
    {},
    {"whiten_advantages": False},
    {"kl_estimator": "k3", "gamma": 0.9, "lam": 0.8, "missing_eos_penalty": 2.5},
    {"kl_estimator": "k2", "whiten_advantages": False, "lam": 1.0},
])
def test_ppo_targets_match_loop_reference(overrides):
    pc = replace(PPOConfig(), **overrides)
    raw_scores, ended, logprobs, ref_logprobs, values, mask, lengths = fixed_batch()
    beta = 0.3
    t = ppo_targets(raw_scores, ended, logprobs, ref_logprobs, values, mask, pc, beta)
    rewards, adv, ret = reference_targets(raw_scores, ended, logprobs, ref_logprobs, values, lengths, pc, beta)
    assert torch.allclose(t.rewards * mask, rewards, atol=1e-5)
    assert torch.allclose(t.advantages * mask, adv, atol=1e-5)
    assert torch.allclose(t.returns * mask, ret, atol=1e-5)
    penalty = pc.missing_eos_penalty * (~ended).float()
    assert torch.allclose(t.penalised, raw_scores - penalty)


def test_ppo_targets_score_sits_on_last_token_and_sums_to_objective():
    pc = replace(PPOConfig(), whiten_advantages=False)
    raw_scores, ended, logprobs, ref_logprobs, values, mask, lengths = fixed_batch(1)
    t = ppo_targets(raw_scores, ended, logprobs, ref_logprobs, values, mask, pc, kl_coef=0.0)
    for b, n in enumerate(lengths):  # beta = 0: the whole reward is the score, on the last response token
        expected = torch.zeros(mask.shape[1])
        expected[n - 1] = t.penalised[b]
        assert torch.allclose(t.rewards[b] * mask[b], expected)
    # gamma = 1: the return at the first token is the row's total reward (the critic cancels out)
    t1 = ppo_targets(raw_scores, ended, logprobs, ref_logprobs, values, mask, replace(pc, lam=1.0), kl_coef=0.2)
    assert torch.allclose(t1.returns[:, 0], (t1.rewards * mask).sum(1), atol=1e-5)


def test_ppo_targets_reward_norm_and_clip():
    pc = replace(PPOConfig(), reward_norm=True, reward_clip=0.5, whiten_advantages=False)
    raw_scores, ended, logprobs, ref_logprobs, values, mask, lengths = fixed_batch(2)
    moments = RunningMoments()
    t = ppo_targets(raw_scores, ended, logprobs, ref_logprobs, values, mask, pc, 0.1, moments)
    penalised = raw_scores - (~ended).float()
    expected = ((penalised - moments.mean) / moments.std).clamp(-0.5, 0.5)
    assert moments.mean == pytest.approx(penalised.double().mean().item(), rel=1e-3)  # updated in place
    assert torch.allclose(t.scores, expected, atol=1e-6)
    assert t.scores.abs().max() <= 0.5 and (t.scores.abs() == 0.5).any()


# ---------------------------------------------------------------- the forward pass PPO trains on

def test_forward_response_values_and_logprobs_match_unpadded_oracle(tokenizer):
    policy = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        policy.save_pretrained(d)
        torch.manual_seed(1)
        value_model = load_scalar_model(d, torch.device("cpu"), "value").eval()
    prompts = ["1 2 3 4 =", "5 =", "9 9 0 1 2 3 ="]
    q, qm = encode_prompts(tokenizer, prompts)  # left-padded
    responses = torch.tensor([[7, 8, 2, 0], [9, 2, 0, 0], [6, 7, 8, 9]])  # 2 = EOS, 0 = pad
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    temperature = 0.7
    with torch.no_grad():
        logprobs, values, entropy = forward_response(policy, value_model, q, qm, responses, rmask, temperature, CPU,
                                                     with_entropy=True)
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt)["input_ids"]
            n = int(rmask[i].sum())
            full = torch.tensor([ids + responses[i, :n].tolist()])
            logp = torch.log_softmax(policy(input_ids=full).logits[0] / temperature, -1)  # (T, V)
            for t in range(n):  # the token at len(ids) + t is predicted at position len(ids) + t - 1
                pos = len(ids) + t - 1
                assert logprobs[i, t].item() == pytest.approx(logp[pos, responses[i, t]].item(), abs=1e-5)
                assert entropy[i, t].item() == pytest.approx(-(logp[pos].exp() * logp[pos]).sum().item(), abs=1e-5)
                # V_t is the critic's estimate of the state before response token t
                v = token_scalars(value_model, full[:, : pos + 1], torch.ones(1, pos + 1, dtype=torch.long))[0, -1]
                assert values[i, t].item() == pytest.approx(v.item(), abs=1e-5)


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disable_dropout_makes_train_mode_deterministic(arch, tokenizer):
    """Llama applies config.attention_dropout functionally: zeroing nn.Dropout modules alone misses it."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.load import tiny_config

    config = tiny_config(TinyModelSpec(arch, 2, 32, 4, 32), tokenizer)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.3)
    config._attn_implementation = "eager"  # the path that reads the dropout float in forward
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), "dropout is active"
        disable_dropout(model)
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.eval()
        c = model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)


# ---------------------------------------------------------------- a real PPO step on a tiny model

@pytest.fixture(scope="module", params=["gpt2", "llama"])
def dropout_dirs(request, tmp_path_factory):
    """A policy whose config asks for dropout everywhere it can, and a reward model from its backbone."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.load import tiny_config
    from rlhfkit.tasks import get_task

    tok = get_task("digits").build_tokenizer()
    root = tmp_path_factory.mktemp(f"ppo_{request.param}")
    config = tiny_config(TinyModelSpec(request.param, 2, 32, 4, 32), tok)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.3)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    torch.manual_seed(1)
    load_scalar_model(root / "sft", torch.device("cpu"), "rm").save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def _tiny_ppo(root, name, overrides):
    from rlhfkit.tasks import get_task

    cfg = load_config(overrides=["ppo.rollout_batch_size=16", "ppo.minibatch_size=16", "ppo.ppo_epochs=1",
                                 "device='cpu'", *overrides])
    out = root / name
    train_ppo(cfg, get_task("digits"), root / "sft", root / "rm", out, CPU)
    return read_metrics(out / "metrics.jsonl")


def test_first_minibatch_ratio_is_one_with_dropout_in_config(dropout_dirs):
    """One epoch, one minibatch: the logged ratio is measured before any update, so it must be exactly 1."""
    (m,) = _tiny_ppo(dropout_dirs, "ratio", ["ppo.total_steps=1"])
    assert m["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["policy/approxkl"] == pytest.approx(0.0, abs=1e-7)
    assert m["policy/clipfrac"] == 0.0
    # objective/entropy is TRL's: summed over a response's tokens, so above the per-token maximum ln(V)
    assert m["objective/entropy"] > math.log(15)


@pytest.mark.parametrize("value_init", ["reward", "shared"])
def test_old_logprobs_and_values_from_the_first_update_change_nothing_but_rounding(dropout_dirs, value_init,
                                                                                   monkeypatch):
    """One minibatch per rollout batch: the first update's forward gives the old log-probs, values and entropy (the
    rollout runs the reference alone), and the run is the one a separate rollout pass gives: the same samples, the
    same metrics and weights within float rounding. Two minibatches: the policy moves between them, the rollout's
    pass stays."""
    import rlhfkit.algorithms.ppo as ppo
    from rlhfkit.models.load import load_policy

    steps = ["ppo.total_steps=3", "ppo.ppo_epochs=2", f"ppo.value_init='{value_init}'"]
    runs = {}
    for reuse in (True, False):
        monkeypatch.setattr(ppo, "REUSE_TRAINING_PASS", reuse)
        runs[reuse] = _tiny_ppo(dropout_dirs, f"reuse_{value_init}_{reuse}", steps)
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["objective/response_length"] == b["objective/response_length"]
        assert a["objective/scores"] == pytest.approx(b["objective/scores"], rel=1e-6)  # the same samples
        for key in ("objective/entropy", "objective/kl", "objective/kl_k1", "policy/ratio", "loss/policy",
                    "loss/value", "value/mean", "value/returns"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert runs[True][-1]["objective/kl_k1"] > 1e-3  # the policy moved: not all log-probs are the reference's
    a, b = (load_policy(dropout_dirs / f"reuse_{value_init}_{r}" / "model", torch.device("cpu")) for r in (True, False))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    monkeypatch.setattr(ppo, "REUSE_TRAINING_PASS", True)
    from rlhfkit.tasks import get_task

    for minibatch, forwards in ((16, 2), (8, 4 - (value_init == "shared"))):
        cfg = load_config(overrides=["ppo.rollout_batch_size=16", f"ppo.minibatch_size={minibatch}", "ppo.total_steps=1",
                                     "device='cpu'", f"ppo.value_init='{value_init}'"])
        result = train_ppo(cfg, get_task("digits"), dropout_dirs / "sft", dropout_dirs / "rm",
                           dropout_dirs / f"passes_{value_init}_{minibatch}", CPU)
        assert result["passes"]["forward"] == forwards * 16, minibatch


def test_adaptive_controller_tracks_unbiased_kl_under_k2(dropout_dirs, monkeypatch):
    """With the biased k2 in the reward, the controller must still be fed the k1 estimate (and follow the
    closed form with it)."""
    import rlhfkit.algorithms.ppo as ppo

    fed = []
    original = ppo.AdaptiveKLController.update
    monkeypatch.setattr(ppo.AdaptiveKLController, "update",
                        lambda self, kl, n: fed.append((kl, n)) or original(self, kl, n))
    metrics = _tiny_ppo(dropout_dirs, "adaptive", ["ppo.total_steps=3", "ppo.kl_estimator='k2'",
                                                    "ppo.adaptive_kl=true", "ppo.target_kl=0.05",
                                                    "ppo.kl_horizon=100", "ppo.lr=0.01"])
    assert [kl for kl, _ in fed] == [m["objective/kl_k1"] for m in metrics]
    assert all(n == 16 for _, n in fed)
    assert any(m["objective/kl"] != pytest.approx(m["objective/kl_k1"]) for m in metrics[1:])
    for prev, cur in zip(metrics, metrics[1:]):
        error = min(max(prev["objective/kl_k1"] / 0.05 - 1, -0.2), 0.2)
        assert cur["objective/kl_coef"] == pytest.approx(prev["objective/kl_coef"] * (1 + error * 16 / 100), rel=1e-9)


# ---------------------------------------------------------------- what the reward model and labelers see

def test_decode_keeps_special_tokens_sampled_mid_response(tokenizer):
    unk, eos, pad = tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    one = tokenizer.convert_tokens_to_ids("1")
    responses = torch.tensor([[one, unk, one, eos], [one, one, one, one], [one, eos, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    s = Samples(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), responses, mask, torch.tensor([True, False, True]))
    assert decode_responses(tokenizer, s) == ["1 <unk> 1", "1 1 1 1", "1"]


def test_truncated_response_scored_with_one_eos(dropout_dirs, monkeypatch):
    """The reward model reads its score at an EOS, also for a response cut at max_new_tokens."""
    import rlhfkit.models.scoring as rewards

    seen = []
    monkeypatch.setattr(rewards, "sequence_scores", lambda model, ids, mask, rt=None: seen.append((ids, mask)) or
                        ids[:, 0].float())
    scorer = rewards.RewardModelScorer(dropout_dirs / "rm", CPU)
    scorer(["1 2 3 4 ="], ["5 6 7 8 9"])
    ids, mask = seen[0]
    row = ids[0][mask[0].bool()].tolist()
    eos = scorer.tokenizer.eos_token_id
    assert row[-1] == eos and row.count(eos) == 1


# ---------------------------------------------------------------- the shared rollout collection

def test_collect_rollouts_groups_and_reference(tokenizer):
    """K completions per prompt as consecutive rows with their group index; a reference equal to the policy
    gives identical log-probs (KL exactly 0); the scorer sees each row's own prompt and decoded text."""
    from rlhfkit.models.reference import Reference
    from rlhfkit.spine.rollout import collect_rollouts

    policy = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
    policy.train()
    seen = []

    def scorer(prompts, texts):
        seen.append((list(prompts), list(texts)))
        return torch.arange(len(prompts), dtype=torch.float32)

    prompts = ["1 2 3 4 =", "5 =", "9 9 0 1 2 3 ="]
    r = collect_rollouts(policy, Reference(policy), scorer, tokenizer, prompts, k=2, max_new_tokens=5,
                         temperature=0.8, generator=torch.Generator().manual_seed(0), rt=CPU)
    assert r.prompts == [p for p in prompts for _ in range(2)] and r.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert seen == [(r.prompts, r.texts)] and r.scores.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(r.logprobs, r.ref_logprobs) and r.values is None
    assert (r.logprobs[r.response_mask == 0] == 0).all() and (r.logprobs[r.response_mask == 1] < 0).all()
    assert policy.training  # the policy's mode is restored after sampling in eval mode
