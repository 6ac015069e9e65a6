"""train.shared_prefix: rows that begin alike forward their common beginning once (rlhfkit.data.batching.
shared_prefix_packing: prefix trees packed into rows, an attention mask per row). Every output (log-probs, values,
entropy, reward-model scores) and every gradient is the padded forward's to rounding; sharp weights (conftest's
sharp_policy) make a token that sees another sequence's tokens, a wrong position or a wrong predictor move them
far more."""

from dataclasses import replace

import pytest
import torch

from rlhfkit.algorithms.reward import encode_comparisons, pair_scores, ranking_scores
from rlhfkit.core.errors import ConfigError
from rlhfkit.data.batching import encode_pairs, pad_left, pad_right, shared_prefix_packing
from rlhfkit.data.contract import Comparison
from rlhfkit.data.ranked import RankedItem, encode_ranked_items
from rlhfkit.models import forward as forward_module
from rlhfkit.models.forward import check_packing, forward_response, row_logprobs
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.value_head import ValueHead

CPU = Runtime(torch.device("cpu"), None)
SHARED = replace(CPU, shared_prefix=True)


def test_common_beginnings_take_their_columns_once_and_each_token_sees_its_own_sequence():
    # rows: a pair sharing 3 tokens, a sequence alone, a duplicate of row 0, a left-padded row sharing 2 with row 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [3, 4, 0, 0, 0], [5, 6, 7, 8, 9], [0, 0, 5, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    p = shared_prefix_packing(ids, mask)
    # sorted: [3 4], [5 6 2], [5 6 7 1], [5 6 7 8 9] twice; each takes columns past what it shares with the one
    # before it: 2 + 3 + 2 + 2 + 0 columns, one row (at most 2 x 5)
    packed = p.pack(ids)
    assert p.packed_shape == (1, 9)
    assert packed[0].tolist() == [3, 4, 5, 6, 2, 7, 1, 8, 9]
    assert p.positions[0].tolist() == [0, 1, 0, 1, 2, 2, 3, 3, 4]
    index = p.flat_index()
    flat_ids, flat_pos = packed.flatten(), p.positions.flatten()
    for b in range(5):
        at = index[b][mask[b].bool()]
        assert flat_ids[at].tolist() == ids[b][mask[b].bool()].tolist()
        assert flat_pos[at].tolist() == list(range(int(mask[b].sum())))
        # each token sees exactly its own sequence's tokens up to itself
        W = p.packed_shape[1]
        for t, q in enumerate(at.tolist()):
            seen = p.attend[q // W, q % W].nonzero().flatten() + (q // W) * W
            assert sorted(seen.tolist()) == sorted(at[: t + 1].tolist())
    assert torch.equal(index[0], index[3])  # a duplicate is all shared
    assert index[1][:3].tolist() == index[0][:3].tolist() and index[1][3] != index[0][3]
    assert index[4][2:4].tolist() == index[0][:2].tolist()  # left padding: real tokens shared all the same
    # a row full: the next sequence starts a row of its own, whole (nothing shared across rows)
    long = shared_prefix_packing(torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9]]), torch.ones(4, 3))
    assert long.pack(torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9]])).tolist() == [
        [1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]


def test_a_batch_sharing_little_keeps_rows_as_wide_as_its_longest_sequence():
    """Twice-the-longest rows pay off only where beginnings are shared: PPO's rows (one reply a prompt, a common
    BOS at most) pack back to back within the longest sequence's width, as padding_free's do, not two to a wider
    row; a group sharing its prompt still gets the wide rows. Fails on a rule that always doubles (or never)."""
    longer = torch.tensor([[1] + list(range(2, 12)), [1] + list(range(12, 22)), [1] + list(range(22, 32))])
    p = shared_prefix_packing(longer, torch.ones_like(longer))  # a BOS shared: 2 of 33 tokens, under 1/8
    assert p.packed_shape == (3, 11)
    ragged = torch.tensor([[1] + list(range(2, 12)), [1, 40, 41, 42, 0, 0, 0, 0, 0, 0, 0], [1, 50, 51] + [0] * 8])
    p = shared_prefix_packing(ragged, (ragged > 0).long())  # short ones share a row, as padding_free packs them
    assert p.packed_shape == (2, 11)
    group = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8], [1, 2, 3, 4, 9, 9]])  # a prompt of 4, 3 replies
    p = shared_prefix_packing(group, torch.ones_like(group))
    assert p.packed_shape == (1, 10)
    assert shared_prefix_packing(longer, torch.ones_like(longer), width=22).packed_shape == (2, 21)


def ragged_pairs(n: int, seed: int):
    """n (prompt, chosen, rejected) of digits words: prompts of 2 to 8 words, replies of 1 to 8 that often begin
    alike (so a common beginning may run into the replies)."""
    import random

    rng = random.Random(seed)
    words = [str(d) for d in range(10)]
    prompts = [" ".join(rng.choices(words, k=rng.randrange(2, 9))) + " =" for _ in range(n)]
    chosen = [" ".join(rng.choices(words, k=rng.randrange(1, 9))) for _ in range(n)]
    rejected = [c.split(" ")[0] + " " + " ".join(rng.choices(words, k=rng.randrange(1, 8))) if i % 2 else
                " ".join(rng.choices(words, k=rng.randrange(1, 9))) for i, c in enumerate(chosen)]
    return prompts, chosen, rejected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunked", [True, False])
def test_dpo_log_probs_and_gradient_are_the_padded_ones(arch, chunked, tokenizer, sharp_policy, monkeypatch):
    """row_logprobs (DPO and its relatives, KTO, online DPO, their references) with shared prefixes: each row's
    log-prob and the gradient of their sum are the padded forward's to rounding, on the chunked head and the
    full-logits path, with fewer tokens computed."""
    if not chunked:
        monkeypatch.setattr(forward_module, "use_chunked", lambda model, chunk: False)
    model = sharp_policy(arch)
    prompts, chosen, rejected = ragged_pairs(10, seed=1)
    seqs = encode_pairs(tokenizer, prompts + prompts, chosen + rejected)
    rows = torch.tensor([0, 3, 5, 8, 10, 13, 15, 18])  # four pairs: their chosen and rejected rows
    out = {}
    for rt in (CPU, SHARED):
        model.zero_grad()
        logps = row_logprobs(model, seqs, rows, rt)
        logps.sum().backward()
        out[rt.shared_prefix] = logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    assert (out[True][1] - out[False][1]).norm() < 1e-4 * out[False][1].norm()
    assert (out[False][0][1:] - out[False][0][:-1]).abs().min() > 1e-2  # distinct: a swapped row would show
    ids, mask = seqs[0][rows], seqs[1][rows]
    p = shared_prefix_packing(ids, mask)
    assert p.flat_index()[mask.bool()].unique().numel() < 0.8 * mask.sum()  # the prompts computed once


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunked", [True, False])
def test_group_rollout_passes_are_the_padded_ones(arch, chunked, tokenizer, sharp_policy, sharp_scalar, monkeypatch):
    """forward_response with shared prefixes (GRPO and RLOO's groups: k replies to one left-padded prompt):
    log-probs, values (a value model of its own, and a value head on the policy), entropy and the log-probs'
    gradient are the padded ones to rounding."""
    import random

    if not chunked:
        monkeypatch.setattr(forward_module, "use_chunked", lambda model, chunk: False)
    rng = random.Random(7)
    words = [str(d) for d in range(10)]
    prompts = [tokenizer(" ".join(rng.choices(words, k=rng.randrange(1, 7))))["input_ids"] for _ in range(3)]
    replies = [tokenizer(" ".join(rng.choices(words, k=rng.randrange(1, 9))), add_special_tokens=False)["input_ids"]
               for _ in range(12)]
    q, qm = pad_left([prompts[i // 4] for i in range(12)], 0)  # groups of 4
    r, rm = pad_right(replies, 0)
    policy = sharp_policy(arch)
    for critic in (sharp_scalar(policy), ValueHead.on(policy, std=0.3)):
        out = {}
        for rt in (CPU, SHARED):
            policy.zero_grad()
            logprobs, values, entropy = forward_response(policy, critic, q, qm, r, rm, 0.7, rt, with_entropy=True)
            (logprobs * rm).sum().backward()
            grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
            out[rt.shared_prefix] = [v * rm for v in (logprobs, values, entropy)] + [grad]
        for padded, shared in zip(out[False][:3], out[True][:3]):
            assert torch.allclose(shared, padded, rtol=1e-5, atol=1e-4)
        assert (out[True][3] - out[False][3]).norm() < 1e-4 * out[False][3].norm()
        assert out[False][0][rm.bool()].std() > 0.5 and out[False][1][rm.bool()].std() > 0.1


def test_reward_model_scores_are_the_padded_ones(tokenizer, sharp_policy, sharp_scalar, monkeypatch):
    """The reward model with shared prefixes: each comparison's two scores (pair_scores) and each ranked
    completion's (ranking_scores), and the gradient, are the padded ones to rounding."""
    scorer = sharp_scalar(sharp_policy("llama"))
    prompts, chosen, rejected = ragged_pairs(12, seed=5)
    data = encode_comparisons(tokenizer, [Comparison(f"i{i}", prompts[i], chosen[i], rejected[i]) for i in range(12)])
    idx = torch.tensor([3, 0, 11, 9, 6])
    out = {}
    for rt in (CPU, SHARED):
        scorer.zero_grad()
        c, r = pair_scores(scorer, data, idx, rt)
        (c - r).sum().backward()
        out[rt.shared_prefix] = c.detach(), r.detach(), torch.cat([p.grad.flatten() for p in scorer.parameters()])
    for a, b in zip(out[False][:2], out[True][:2]):
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-5)
    assert (out[True][2] - out[False][2]).norm() < 1e-4 * out[False][2].norm()
    assert torch.cat(out[False][:2]).std() > 0.5  # scores far apart: a token read from another row would show
    items = [RankedItem(f"i{i}", prompts[i], [chosen[i], rejected[i], "4"], [[[0], [1], [2]]], "") for i in range(6)]
    ranked = encode_ranked_items(tokenizer, items)
    grids = [ranking_scores(scorer, ranked, torch.tensor([1, 4, 2]), rt)[0] for rt in (CPU, SHARED)]
    assert torch.allclose(grids[1], grids[0], rtol=1e-5, atol=1e-5)


def test_a_model_that_ignores_the_mask_is_refused(tokenizer, sharp_policy, sharp_scalar, monkeypatch):
    """check_packing(shared=True) measures a model attending past its own sequence (the tree mask dropped: each
    token then sees every earlier column), and the first shared forward refuses it; an attention that takes no
    custom mask is refused by name."""
    policy, scorer = sharp_policy("gpt2"), sharp_scalar(sharp_policy("gpt2"))
    prompts, chosen, rejected = ragged_pairs(4, seed=2)
    seqs = encode_pairs(tokenizer, prompts + prompts, chosen + rejected)
    assert check_packing(policy, seqs[0], seqs[1], shared=True) < forward_module.PACKING_TOLERANCE
    assert check_packing(scorer, seqs[0], seqs[1], shared=True) < forward_module.PACKING_TOLERANCE
    real = forward_module.packed_inputs

    def no_tree(model, p, ids):
        inputs = real(model, p, ids)
        inputs.pop("attention_mask", None)
        return inputs

    monkeypatch.setattr(forward_module, "packed_inputs", no_tree)
    for model in (sharp_policy("gpt2", seed=3), sharp_scalar(sharp_policy("gpt2"), seed=3)):
        assert check_packing(model, seqs[0], seqs[1], shared=True) > forward_module.PACKING_TOLERANCE
    with pytest.raises(ConfigError, match="train.shared_prefix"):
        row_logprobs(sharp_policy("gpt2", seed=4), seqs, torch.tensor([0, 4]), SHARED)
    monkeypatch.setattr(forward_module, "packed_inputs", real)
    other = sharp_policy("gpt2", seed=5)
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="'sdpa' or 'eager'"):
        row_logprobs(other, seqs, torch.tensor([0, 4]), SHARED)


def test_eager_attention_reads_the_mask_as_sdpa_does(tokenizer, sharp_policy):
    """The same log-probs with eager attention (an additive float mask) as with SDPA (a bool mask)."""
    prompts, chosen, rejected = ragged_pairs(6, seed=3)
    seqs = encode_pairs(tokenizer, prompts + prompts, chosen + rejected)
    rows = torch.arange(12)
    model = sharp_policy("llama")
    assert model.config._attn_implementation == "sdpa"
    sdpa = row_logprobs(model, seqs, rows, SHARED)
    model.config._attn_implementation = "eager"
    forward_module._packing_checked.pop(model, None)
    eager = row_logprobs(model, seqs, rows, SHARED)
    assert torch.allclose(eager, sdpa, rtol=1e-5, atol=1e-4)
    assert torch.allclose(eager, row_logprobs(model, seqs, rows, CPU), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_the_check_runs_in_fp32_under_the_callers_autocast(shared, tokenizer, sharp_policy):
    """check_packing measures in fp32 whatever autocast its caller runs under (the packed passes call it inside
    the run's autocast): bf16's rounding alone moved SmolLM2's log-probs by 0.4 and refused a model that keeps
    packed sequences apart, with train.padding_free as with train.shared_prefix."""
    prompts, chosen, rejected = ragged_pairs(4, seed=6)
    ids, mask, _ = encode_pairs(tokenizer, prompts + prompts, chosen + rejected)
    model = sharp_policy("llama")
    fp32 = check_packing(model, ids, mask, shared=shared)
    with torch.autocast("cpu", torch.bfloat16):
        assert check_packing(model, ids, mask, shared=shared) == fp32
        assert torch.is_autocast_enabled("cpu")  # left as it was
