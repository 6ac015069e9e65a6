"""RLOO and GRPO: their composed targets and losses on fixed batches against plain loops written from the papers'
equations and against TRL 1.12.0's own loss code (run here), then real steps on tiny models: the first ratio is
exactly 1, a toy reward rises (the whole loop has the right sign), an interrupted run resumes to the same
weights and metrics, every logged name is in docs/metrics.md. Outcomes at the default budget on digits are
asserted in tests/test_acceptance.py (METHOD_TARGETS in benchmarks/acceptance.py).
"""

import math
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.algorithms.grpo import grpo_targets, train_grpo
from rlhfkit.algorithms.rloo import rloo_targets, train_rloo
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import read_metrics
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_scalar_model
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import grpo_policy_loss, rloo_policy_loss
from rlhfkit.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), None)
K = 3
LENGTHS = [5, 2, 5, 1, 4, 3]  # two prompts x K = 3 responses; ragged, so per-sequence and token means differ


def fixed_batch(seed=0, T=5):
    """Ragged right-padded responses with garbage outside the mask (it must never matter), rows 0 and 2 cut
    at the budget (no EOS), log-prob gaps large enough that some sequence and token ratios leave the clip range."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])
    ended = torch.tensor([n < T for n in LENGTHS])
    garbage = (1 - mask) * 7.0
    logprobs = -torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2 + garbage
    old_logprobs = logprobs - 0.3 * torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) - garbage
    ref_logprobs = -torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2 - garbage
    raw_scores = torch.randn(len(LENGTHS), generator=g, dtype=torch.float64) * 2
    return raw_scores, ended, logprobs, old_logprobs, ref_logprobs, mask


def k3(lp, ref):  # Schulman's k3 of KL(pi || ref) from one sampled token: ref/pi - log(ref/pi) - 1
    return math.exp(ref - lp) - (ref - lp) - 1


def clip(x, eps):
    return min(max(x, 1 - eps), 1 + eps)


# ---------------------------------------------------------------- RLOO: KL in the reward, leave-one-out baseline

def rloo_targets_loop(raw_scores, ended, logprobs, ref_logprobs, beta, penalty):
    """One row, one token at a time: R_i = score_i - penalty [no EOS] - beta * sum_t (lp - ref) over the
    response; A_i = R_i - mean of the OTHER K - 1 rewards of the prompt's group (consecutive rows)."""
    rewards = []
    for b, n in enumerate(LENGTHS):
        kl = sum(logprobs[b, t].item() - ref_logprobs[b, t].item() for t in range(n))
        rewards.append(raw_scores[b].item() - (0.0 if ended[b] else penalty) - beta * kl)
    advantages = []
    for b, r in enumerate(rewards):
        group = range(b // K * K, b // K * K + K)
        advantages.append(r - sum(rewards[j] for j in group if j != b) / (K - 1))
    return rewards, advantages


@pytest.mark.parametrize("beta,penalty", [(0.3, 1.0), (0.0, 2.5), (1.7, 0.0)])
def test_rloo_targets_match_loop(beta, penalty):
    raw_scores, ended, logprobs, _, ref_logprobs, mask = fixed_batch()
    t = rloo_targets(raw_scores, ended, logprobs, ref_logprobs, mask, K, beta, penalty)
    rewards, advantages = rloo_targets_loop(raw_scores, ended, logprobs, ref_logprobs, beta, penalty)
    assert torch.allclose(t.rewards, torch.tensor(rewards, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(t.advantages, torch.tensor(advantages, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(t.penalised, raw_scores - penalty * (~ended).double())
    assert torch.allclose(t.rewards, t.penalised - beta * t.kl)


def test_rloo_kl_lowers_the_reward_of_the_responses_that_moved():
    """The KL term is there and has its sign: raising one response's policy log-prob lowers its reward by
    beta per nat and raises its siblings' advantages (their baseline fell)."""
    raw_scores, ended, logprobs, _, ref_logprobs, mask = fixed_batch(1)
    a = rloo_targets(raw_scores, ended, logprobs, ref_logprobs, mask, K, 0.5, 1.0)
    moved = logprobs.clone()
    moved[0, 0] += 1.0
    b = rloo_targets(raw_scores, ended, moved, ref_logprobs, mask, K, 0.5, 1.0)
    assert b.rewards[0] == pytest.approx(a.rewards[0].item() - 0.5)
    assert (b.advantages[1:K] > a.advantages[1:K]).all() and torch.equal(b.advantages[K:], a.advantages[K:])


def trl_rloo_rewards_and_advantages(rewards, old_per_token_logps, ref_per_token_logps, completion_mask, beta, k):
    """Copied from trl 1.12.0, trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions, lines
    1571-1597 (one process, every completion scorable, normalize_advantages=False, the default)."""
    per_token_kl = old_per_token_logps - ref_per_token_logps
    kl = (per_token_kl * completion_mask).sum(-1)
    rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    return rewards, rewards - baselines


def test_rloo_targets_match_trl():
    pytest.importorskip("trl.trainer.rloo_trainer", reason="TRL is the reference: pip install -e '.[dev]'")
    raw_scores, ended, logprobs, _, ref_logprobs, mask = fixed_batch(2)
    ended = torch.ones_like(ended)  # TRL has no missing-EOS penalty in this path
    t = rloo_targets(raw_scores, ended, logprobs, ref_logprobs, mask, K, 0.4, 1.0)
    rewards, advantages = trl_rloo_rewards_and_advantages(raw_scores, logprobs, ref_logprobs, mask, 0.4, K)
    assert torch.allclose(t.rewards, rewards, atol=1e-12) and torch.allclose(t.advantages, advantages, atol=1e-12)


def rloo_loss_loop(logprobs, old_logprobs, advantages, eps):
    """mean_i max(-A_i rho_i, -A_i clip(rho_i)), rho_i = exp(sum over the response of lp - old lp)."""
    total = 0.0
    for b, n in enumerate(LENGTHS):
        rho = math.exp(sum(logprobs[b, t].item() - old_logprobs[b, t].item() for t in range(n)))
        a = advantages[b].item()
        total += max(-a * rho, -a * clip(rho, eps))
    return total / len(LENGTHS)


@pytest.mark.parametrize("eps", [0.2, 0.05, 10.0])
def test_rloo_policy_loss_matches_loop(eps):
    _, _, logprobs, old_logprobs, _, mask = fixed_batch(3)
    advantages = torch.tensor([1.5, -0.5, -1.0, 2.0, 0.3, -2.3], dtype=torch.float64)
    loss, stats = rloo_policy_loss(logprobs, old_logprobs, advantages, mask, eps)
    assert loss.item() == pytest.approx(rloo_loss_loop(logprobs, old_logprobs, advantages, eps), abs=1e-12)
    if eps == 0.05:  # the batch's sequence ratios leave [0.95, 1.05]: clipping must show in the loss
        assert 0 < stats["policy/clipfrac"] < 1
        assert loss.item() != pytest.approx(rloo_loss_loop(logprobs, old_logprobs, advantages, 1e9), abs=1e-6)


def test_rloo_policy_loss_on_policy_gradient_is_reinforce():
    """At rho = 1 the gradient is REINFORCE's: d loss / d logprobs_it = -A_i / B on response tokens, 0 elsewhere."""
    _, _, logprobs, _, _, mask = fixed_batch(4)
    logprobs = logprobs.clone().requires_grad_(True)
    advantages = torch.tensor([1.5, -0.5, -1.0, 2.0, 0.3, -2.3], dtype=torch.float64)
    loss, stats = rloo_policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2)
    loss.backward()
    expected = -advantages[:, None] / len(LENGTHS) * mask
    assert torch.allclose(logprobs.grad, expected, atol=1e-12)
    assert stats["policy/ratio"] == 1.0 and stats["policy/clipfrac"] == 0.0 and stats["policy/approxkl"] == 0.0


# ---------------------------------------------------------------- GRPO: group-normalised advantages, KL in the loss

def test_grpo_targets_match_loop():
    raw_scores, ended, *_ = fixed_batch(5)
    t = grpo_targets(raw_scores, ended, K, 1.5)
    penalised = [raw_scores[b].item() - (0.0 if ended[b] else 1.5) for b in range(len(LENGTHS))]
    for b in range(len(LENGTHS)):
        group = penalised[b // K * K : b // K * K + K]
        mean = sum(group) / K
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (K - 1))  # unbiased, as TRL
        assert t.advantages[b].item() == pytest.approx((penalised[b] - mean) / (std + 1e-4), abs=1e-12)
    assert t.penalised.tolist() == pytest.approx(penalised)


def grpo_loss_loop(logprobs, old_logprobs, ref_logprobs, advantages, eps, beta):
    """DeepSeekMath eq. 3 as a loss: mean_i 1/|o_i| sum_t [max(-A_i rho_it, -A_i clip(rho_it)) + beta k3_it]."""
    total = 0.0
    for b, n in enumerate(LENGTHS):
        seq = 0.0
        for t in range(n):
            lp, old, ref = logprobs[b, t].item(), old_logprobs[b, t].item(), ref_logprobs[b, t].item()
            rho, a = math.exp(lp - old), advantages[b].item()
            seq += max(-a * rho, -a * clip(rho, eps)) + beta * k3(lp, ref)
        total += seq / n
    return total / len(LENGTHS)


@pytest.mark.parametrize("eps,beta", [(0.2, 0.04), (0.05, 0.5), (0.2, 0.0)])
def test_grpo_policy_loss_matches_loop(eps, beta):
    _, _, logprobs, old_logprobs, ref_logprobs, mask = fixed_batch(6)
    advantages = torch.tensor([1.1, -0.2, -0.9, 0.7, 0.7, -1.4], dtype=torch.float64)
    loss, stats = grpo_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, eps, beta)
    assert loss.item() == pytest.approx(grpo_loss_loop(logprobs, old_logprobs, ref_logprobs, advantages, eps, beta),
                                        abs=1e-12)
    assert loss.item() == pytest.approx((stats["loss/policy"] + beta * stats["loss/kl"]).item(), abs=1e-12)


def test_grpo_loss_normalisation_is_per_sequence_then_batch():
    """On ragged lengths the paper's mean (per response, then over responses) differs from DAPO's token-level
    mean; ours is the paper's. A response's weight does not depend on its length."""
    _, _, logprobs, _, ref_logprobs, mask = fixed_batch(7)
    advantages = torch.zeros(len(LENGTHS), dtype=torch.float64)
    _, stats = grpo_policy_loss(logprobs, logprobs, ref_logprobs, advantages, mask, 0.2, 1.0)
    per_token = [[k3(logprobs[b, t].item(), ref_logprobs[b, t].item()) for t in range(n)] for b, n in enumerate(LENGTHS)]
    per_sequence = sum(sum(row) / len(row) for row in per_token) / len(per_token)
    token_level = sum(map(sum, per_token)) / sum(LENGTHS)
    assert stats["loss/kl"].item() == pytest.approx(per_sequence, abs=1e-12)
    assert abs(per_sequence - token_level) > 1e-3  # the batch tells the two apart


def test_grpo_kl_term_zero_at_reference_and_pulls_towards_it():
    """policy = reference: the KL term and its gradient are 0. Away from it, a gradient step on the KL term
    alone (advantages 0) lowers the k3 estimate: the term pulls the policy back, with its sign."""
    _, _, logprobs, _, ref_logprobs, mask = fixed_batch(8)
    zeros = torch.zeros(len(LENGTHS), dtype=torch.float64)
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_policy_loss(lp, lp.detach(), lp.detach().clone(), zeros, mask, 0.2, 0.7)
    loss.backward()
    assert stats["loss/kl"] == 0.0 and (lp.grad == 0).all()
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_policy_loss(lp, lp.detach(), ref_logprobs, zeros, mask, 0.2, 0.7)
    loss.backward()
    stepped = (lp - 1e-2 * lp.grad).detach()
    _, after = grpo_policy_loss(stepped, stepped, ref_logprobs, zeros, mask, 0.2, 0.7)
    assert stats["loss/kl"] > 0 and after["loss/kl"] < stats["loss/kl"]
    assert (lp.grad[mask == 0] == 0).all()


def test_grpo_positive_advantage_raises_its_tokens():
    """Sign: with beta = 0 and rho = 1, d loss / d logprobs_it = -A_i / (|o_i| B) on response tokens."""
    _, _, logprobs, _, ref_logprobs, mask = fixed_batch(9)
    lp = logprobs.clone().requires_grad_(True)
    advantages = torch.tensor([1.1, -0.2, -0.9, 0.7, 0.7, -1.4], dtype=torch.float64)
    loss, _ = grpo_policy_loss(lp, lp.detach(), ref_logprobs, advantages, mask, 0.2, 0.0)
    loss.backward()
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    assert torch.allclose(lp.grad, -(advantages / lengths)[:, None] / len(LENGTHS) * mask, atol=1e-12)


# ---------------------------------------------------------------- the same losses in TRL 1.12.0, run here

def _trl_self(**attrs):
    """The few attributes TRL's _compute_loss reads from its trainer, for one process and no extras."""
    identity = SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x,
                               num_processes=1, sync_gradients=True)
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)


def _trl_inputs(logprobs, mask, **extra):
    B, T = logprobs.shape
    prompt = torch.ones(B, 2, dtype=torch.long)
    return {"prompt_ids": prompt, "prompt_mask": prompt, "completion_ids": torch.ones(B, T, dtype=torch.long),
            "completion_mask": mask, **extra}


def _per_token_logps(logprobs):
    return lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None)


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_rloo_policy_loss_matches_trl(eps):
    trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer", reason="TRL is the reference: pip install -e '.[dev]'")
    _, _, logprobs, old_logprobs, _, mask = fixed_batch(10)
    mask = mask.to(torch.float64)
    advantages = torch.tensor([1.5, -0.5, -1.0, 2.0, 0.3, -2.3], dtype=torch.float64)
    ours_lp = logprobs.clone().requires_grad_(True)
    theirs_lp = logprobs.clone().requires_grad_(True)
    ours, _ = rloo_policy_loss(ours_lp, old_logprobs, advantages, mask, eps)
    trainer = _trl_self(epsilon_low=eps, epsilon_high=eps, _get_per_token_logps_and_entropies=_per_token_logps(theirs_lp))
    old_logps = (old_logprobs * mask).sum(1)  # TRL keeps the old sequence log-prob, summed over the completion
    theirs = trl_rloo.RLOOTrainer._compute_loss(trainer, None, _trl_inputs(theirs_lp, mask, old_logps=old_logps,
                                                                            advantages=advantages))
    (ours + theirs).backward()  # one backward, two leaves
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    assert torch.allclose(ours_lp.grad, theirs_lp.grad, atol=1e-12)


@pytest.mark.parametrize("eps,beta", [(0.2, 0.04), (0.05, 0.5)])
def test_grpo_policy_loss_matches_trl(eps, beta):
    """TRL's loss_type = "grpo" (the paper's normalisation), token-level importance sampling, k3 in the loss."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is the reference: pip install -e '.[dev]'")
    _, _, logprobs, old_logprobs, ref_logprobs, mask = fixed_batch(11)
    mask = mask.to(torch.float64)
    advantages = torch.tensor([1.1, -0.2, -0.9, 0.7, 0.7, -1.4], dtype=torch.float64)
    ours_lp = logprobs.clone().requires_grad_(True)
    theirs_lp = logprobs.clone().requires_grad_(True)
    ours, _ = grpo_policy_loss(ours_lp, old_logprobs, ref_logprobs, advantages, mask, eps, beta)
    trainer = _trl_self(epsilon_low=eps, epsilon_high=eps, beta=beta, loss_type="grpo", importance_sampling_level="token",
                        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
                        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
                        _get_per_token_logps_and_entropies=_per_token_logps(theirs_lp))
    # TRL's padding holds its own values; ours must ignore what sits there, so give TRL the same tensors
    theirs = trl_grpo.GRPOTrainer._compute_loss(trainer, None, _trl_inputs(
        theirs_lp, mask, advantages=advantages, old_per_token_logps=old_logprobs, ref_per_token_logps=ref_logprobs))
    (ours + theirs).backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    assert torch.allclose(ours_lp.grad, theirs_lp.grad, atol=1e-12)


# ---------------------------------------------------------------- real steps on tiny models

TRAIN = {"rloo": train_rloo, "grpo": train_grpo}
TINY = ["prompts_per_step=4", "k=4", "minibatch_size=8", "epochs=2", "checkpoint_every=2"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; beside other jobs, two threads wait on each other (60x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random policy and a reward model from its backbone (a fresh head), saved like the pipeline's."""
    from rlhfkit.tasks import get_task

    tok = get_task("digits").build_tokenizer()
    root = tmp_path_factory.mktemp("group")
    build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    torch.manual_seed(1)
    load_scalar_model(root / "sft", torch.device("cpu"), "rm").save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def _train(root, method, name, overrides=()):
    from rlhfkit.tasks import get_task

    cfg = load_config(overrides=["device='cpu'", *(f"{method}.{o}" for o in TINY), *overrides])
    out = root / name
    result = TRAIN[method](cfg, get_task("digits"), root / "sft", root / "rm", out, CPU)
    return result, out


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_first_step_ratio_is_one_and_passes_counted(tiny_dirs, method):
    """One epoch, one minibatch: the ratio is measured before any update, so it is exactly 1."""
    result, out = _train(tiny_dirs, method, f"{method}_ratio",
                         [f"{method}.total_steps=1", f"{method}.epochs=1", f"{method}.minibatch_size=16"])
    (m,) = read_metrics(out / "metrics.jsonl")
    assert m["policy/ratio"] == pytest.approx(1.0, abs=1e-6) and m["policy/clipfrac"] == 0.0
    assert m["policy/approxkl"] == pytest.approx(0.0, abs=1e-7)
    assert m["objective/kl_k1"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    # GRPO's old log-probs come from its training pass (one update per batch): no policy pass at rollout time
    assert result["passes"] == {"sampled": 16, "forward": 48 if method == "rloo" else 32, "backward": 16}


def test_grpo_old_logprobs_from_the_training_pass_change_nothing_but_rounding(tiny_dirs, monkeypatch):
    """One update per batch: the old log-probs and the entropy metric taken from the training pass (detached)
    give the run that a separate rollout pass gives: the same metrics and weights within float rounding, and the
    same samples (the random streams do not depend on it)."""
    import rlhfkit.algorithms.grpo as grpo
    from rlhfkit.models.load import load_policy

    steps = ["grpo.total_steps=3", "grpo.epochs=1", "grpo.minibatch_size=16"]
    _train(tiny_dirs, "grpo", "grpo_reuse", steps)
    monkeypatch.setattr(grpo, "REUSE_TRAINING_LOGPROBS", False)
    result, _ = _train(tiny_dirs, "grpo", "grpo_separate", steps)
    assert result["passes"]["forward"] == 3 * 3 * 16
    root = tiny_dirs
    reuse, separate = (read_metrics(root / n / "metrics.jsonl") for n in ("grpo_reuse", "grpo_separate"))
    for a, b in zip(reuse, separate, strict=True):
        assert a["objective/response_length"] == b["objective/response_length"]
        assert a["objective/scores"] == b["objective/scores"]  # the same samples
        for key in ("objective/entropy", "objective/kl", "objective/kl_k1", "policy/ratio", "loss/policy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert reuse[-1]["objective/kl_k1"] > 1e-4  # the policy moved: the log-probs compared are not all the reference's
    a, b = (load_policy(root / n / "model", torch.device("cpu")) for n in ("grpo_reuse", "grpo_separate"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    # two updates per batch (epochs 2, or two minibatches): the policy moves between them, the rollout's pass stays
    monkeypatch.setattr(grpo, "REUSE_TRAINING_LOGPROBS", True)
    for more in (["grpo.epochs=2", "grpo.minibatch_size=16"], ["grpo.epochs=1", "grpo.minibatch_size=8"]):
        result, _ = _train(tiny_dirs, "grpo", "grpo_" + more[0][-1] + more[1][-2:], ["grpo.total_steps=1", *more])
        assert result["passes"]["forward"] == 3 * 16, more


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_metric_names_are_in_the_glossary(tiny_dirs, method):
    _, out = _train(tiny_dirs, method, f"{method}_names", [f"{method}.total_steps=1"])
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / "metrics.jsonl") for k in rec}
    assert logged - glossary == set(), f"{method} logs undocumented metrics"


class Interrupted(Exception):
    pass


def dies_in_call(real, n: int):
    """`real`, except that its n-th call raises Interrupted (a run killed in step n)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Interrupted
        return real(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_interrupted_run_resumes_to_identical_weights(tiny_dirs, method, monkeypatch):
    """Checkpoint every 2 steps; the run dies in step 4 (step 3 done and logged, not checkpointed). Rerunning
    resumes from step 2 and ends with the uninterrupted run's weights and metrics, each step logged once."""
    import importlib

    from safetensors.torch import load_file

    module = importlib.import_module("rlhfkit.spine.online")  # where the online loop samples
    budget = [f"{method}.total_steps=5"]
    full, full_out = _train(tiny_dirs, method, f"{method}_full", budget)
    real = module.collect_rollouts
    monkeypatch.setattr(module, "collect_rollouts", dies_in_call(real, 4))
    with pytest.raises(Interrupted):
        _train(tiny_dirs, method, f"{method}_resumed", budget)
    monkeypatch.setattr(module, "collect_rollouts", real)
    resumed, out = _train(tiny_dirs, method, f"{method}_resumed", budget)
    assert resumed["resumed"] is True and not full["resumed"]
    a, b = load_file(full_out / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {method} differs from the uninterrupted run"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert read_metrics(out / "metrics.jsonl") == read_metrics(full_out / "metrics.jsonl")
    assert resumed["passes"] == full["passes"]


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_toy_reward_rises(tiny_dirs, method, monkeypatch):
    """The whole loop has the right sign: with a reward of 1 for responses that start with '7' (a random
    policy's first token is '7' about 1 time in 15), a few dozen steps make it most likely."""
    import rlhfkit.spine.rollout as rollout

    def starts_with_7(prompts, texts):
        return torch.tensor([1.0 if t.startswith("7") else 0.0 for t in texts])

    monkeypatch.setattr(rollout, "build_scorer", lambda cfg, task, rm_dir, rt: starts_with_7)
    _, out = _train(tiny_dirs, method, f"{method}_toy", [f"{method}.total_steps=40", f"{method}.prompts_per_step=8",
                                                          f"{method}.minibatch_size=16", f"{method}.lr=0.01",
                                                          f"{method}.beta=0.01"])
    scores = [m["objective/scores"] for m in read_metrics(out / "metrics.jsonl")]
    assert sum(scores[:3]) / 3 < 0.25 and sum(scores[-5:]) / 5 > 0.6, scores


@pytest.mark.parametrize("method", ["rloo", "grpo"])
@pytest.mark.parametrize("override,message", [
    ("k=1", "at least 2 completions"),
    ("minibatch_size=48", "must divide"),
    ("minibatch_size=1000", "larger than a batch"),
    ("beta=-0.1", "must be >= 0"),
    ("clip_range=0", "must be > 0"),
    ("epochs=0", "at least 1"),
])
def test_bad_config_is_a_config_error_naming_the_field(method, override, message):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{method}\.{key}.*{message}"):
        load_config(overrides=[f"{method}.{override}"])


# ---------------------------------------------------------------- through the pipeline (OUT/.partial/METHOD)

PIPELINE = ["sft.n_demos=2000", "sft.epochs=1", "feedback.n_prompts=200", "reward.epochs=1", "eval.n_prompts=50",
            "eval.dist_samples=50", "device='cpu'", "threads=1"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny run's SFT, feedback and reward stages (their quality does not matter here)."""
    from rlhfkit.pipeline.stages import run_stage

    out = tmp_path_factory.mktemp("pipeline") / "base"
    cfg = load_config(overrides=PIPELINE)
    for stage in ("sft", "feedback", "reward"):
        run_stage(stage, cfg, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_interrupted_stage_resumes_in_the_pipeline(upstream, method, tmp_path, monkeypatch):
    """Registered resumable: the pipeline keeps OUT/.partial/METHOD of a run that died, and the next run_stage
    resumes it from its checkpoint to the weights and metrics of an uninterrupted run."""
    import importlib
    import shutil

    from safetensors.torch import load_file

    from rlhfkit.pipeline.stages import run_stage

    cfg = load_config(overrides=PIPELINE + [f"method='{method}'", *(f"{method}.{o}" for o in TINY),
                                            f"{method}.total_steps=5"])
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    shutil.copytree(upstream, full)
    shutil.copytree(upstream, resumed)
    run_stage(method, cfg, full)

    module = importlib.import_module("rlhfkit.spine.online")  # where the online loop samples
    real = module.collect_rollouts
    monkeypatch.setattr(module, "collect_rollouts", dies_in_call(real, 4))  # after the checkpoint of step 2
    with pytest.raises(Interrupted):
        run_stage(method, cfg, resumed)
    assert not (resumed / method).exists() and (resumed / ".partial" / method / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(module, "collect_rollouts", real)
    result = run_stage(method, cfg, resumed)
    assert result["resumed"] is True and result["steps"] == 5
    a = load_file(full / method / "model" / "model.safetensors")
    b = load_file(resumed / method / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {method} differs from the uninterrupted run"
    assert read_metrics(resumed / method / "metrics.jsonl") == read_metrics(full / method / "metrics.jsonl")
