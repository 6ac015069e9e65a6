"""Batches cut to their own longest row (rlhfkit.data.batching.used_columns): the offline trainers' data is padded
to the longest sequence of the whole dataset, and SFT, the reward model and the DPO family forward only the
columns some row of the batch uses, as a collator padding each batch would. The figures are the untrimmed ones to
float rounding (the columns cut hold only padding). And train.padding_free: each batch's sequences packed back to
back (rlhfkit.data.batching.packed_rows), with the padded loss and gradient."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.reward import encode_comparisons, pair_scores, ranking_scores
from rlhfkit.data.batching import encode_pairs, pack, packed_rows, packing, used_columns
from rlhfkit.data.contract import Comparison
from rlhfkit.data.ranked import RankedItem, encode_ranked_items
from rlhfkit.models import forward as forward_module
from rlhfkit.models.forward import check_packing, forward_response, row_logprobs, sequence_logprobs
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine import finetune

CPU = Runtime(torch.device("cpu"), None)


def test_used_columns():
    right = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert used_columns(right) == 3
    assert used_columns(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])) == 4  # left padding: every column
    assert used_columns(torch.tensor([[1, 0, 1, 0]])) == 3  # a hole is not an end
    assert used_columns(torch.zeros(2, 4, dtype=torch.long)) == 0
    assert used_columns(torch.ones(1, 1, dtype=torch.long)) == 1


def ragged(n: int, seed: int = 0):
    """n digits-like (prompt, completion) pairs of lengths that vary from 1 to 12 completion words."""
    rng = random.Random(seed)
    prompts = [" ".join(str(rng.randrange(10)) for _ in range(4)) + " =" for _ in range(n)]
    completions = [" ".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 13))) for _ in range(n)]
    return prompts, completions


@pytest.fixture
def model(tokenizer):
    return build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)


def test_sft_forwards_each_batch_at_its_own_longest_row(tokenizer, model, monkeypatch):
    """Every forward of the SFT loop and of its evaluation is as wide as its longest row; the loss is the
    untrimmed one to rounding."""
    ids, mask, comp = encode_pairs(tokenizer, *ragged(64))
    widths = []
    real = finetune.completion_nll

    def spy(model_, ids_, mask_, comp_, rt):
        widths.append((ids_.shape[1], used_columns(mask_), ids_.shape[1] < ids.shape[1]))
        return real(model_, ids_, mask_, comp_, rt)

    monkeypatch.setattr(finetune, "completion_nll", spy)
    finetune.fit_completions(model, (ids, mask, comp), epochs=1, batch_size=8, lr=1e-3, rt=CPU,
                             generator=torch.Generator().manual_seed(0), heldout=(ids[:8], mask[:8], comp[:8]))
    finetune.evaluate_nll(model, (ids, mask, comp), 4, CPU)
    assert len(widths) == 8 + 16
    assert all(w == used for w, used, _ in widths)  # no column of padding only
    assert sum(cut for *_, cut in widths) >= 12  # most batches are narrower than the dataset
    trimmed = finetune.evaluate_nll(model, (ids, mask, comp), 64, CPU)
    monkeypatch.setattr(finetune, "used_columns", lambda m: m.shape[1])  # the whole width
    assert finetune.evaluate_nll(model, (ids, mask, comp), 64, CPU) == pytest.approx(trimmed, rel=1e-6)


def test_reward_model_and_dpo_forward_each_batch_at_its_own_longest_row(tokenizer, model, monkeypatch):
    prompts, completions = ragged(32)
    comparisons = [Comparison(f"i{i}", prompts[i], completions[i], completions[(i + 7) % 32]) for i in range(32)]
    data = encode_comparisons(tokenizer, comparisons)
    width = data.inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    scorer = GPT2ForSequenceClassification(GPT2Config(**{**model.config.to_dict(), "id2label": {0: "score"}})).eval()
    widths = []
    real_rewards, real_scores = reward_module.sequence_rewards, reward_module.sequence_scores
    monkeypatch.setattr(reward_module, "sequence_rewards",
                        lambda m, batch, d, rt=None: widths.append(batch["attention_mask"]) or
                        real_rewards(m, batch, d, rt))
    monkeypatch.setattr(reward_module, "sequence_scores",
                        lambda m, ids, mask, rt=None: widths.append(mask) or real_scores(m, ids, mask, rt))
    lengths = data.inputs["attention_mask"].sum(1)
    idx = torch.maximum(lengths[:32], lengths[32:]).argsort()[:3]  # three comparisons shorter than the longest
    chosen, rejected = pair_scores(scorer, data, idx, CPU)
    items = [RankedItem("long", prompts[0], ["1 2 3 4 5 6 7 8 9 1 2 3", "4"], [[[0], [1]]], "")] + [
        RankedItem(f"i{i}", prompts[i], ["1 2", "3"], [[[0], [1]]], "") for i in range(1, 4)]
    ranked = encode_ranked_items(tokenizer, items)
    ranking_scores(scorer, ranked, torch.tensor([1, 3]), CPU)  # not the long item
    assert len(widths) == 2 and all(m[:, -1].any() for m in widths)  # no column of padding only
    assert widths[0].shape[1] < width and widths[1].shape[1] < ranked.seqs[0].shape[1]
    # the untrimmed forward: the same scores to rounding
    monkeypatch.setattr(reward_module, "used_columns", lambda m: m.shape[1])
    full_chosen, full_rejected = pair_scores(scorer, data, idx, CPU)
    assert torch.allclose(chosen, full_chosen, atol=1e-6) and torch.allclose(rejected, full_rejected, atol=1e-6)
    # DPO's rows (rlhfkit.models.forward.row_logprobs): its width is the rows' longest
    seqs = encode_pairs(tokenizer, prompts, completions)
    rows = seqs[1].sum(1).argsort()[:3]  # three rows shorter than the longest
    T = used_columns(seqs[1][rows])
    assert T < seqs[0].shape[1]
    full = sequence_logprobs(model, seqs[0][rows], seqs[1][rows], seqs[2][rows])
    monkeypatch.setattr(forward_module, "sequence_logprobs",
                        lambda m, ids, *rest: widths.append(ids.shape[1]) or sequence_logprobs(m, ids, *rest))
    assert torch.allclose(row_logprobs(model, seqs, rows, CPU), full, atol=1e-5)
    assert widths[-1] == T


# ---------------------------------------------------------------- train.padding_free: sequences packed, no padding

def test_pack_is_first_fit_decreasing_and_places_every_sequence_once():
    assert pack([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    assert pack([2, 2, 2], 6) == [[0, 1, 2]]
    lengths = [random.Random(s).randrange(1, 20) for s in range(50)]
    rows = pack(lengths, 20)
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(lengths[i] for i in r) <= 20 for r in rows)
    with pytest.raises(ValueError, match="does not fit"):
        pack([7], 6)


def test_packed_rows_put_sequences_back_to_back_with_positions_restarting():
    ids = torch.tensor([[11, 12, 13, 0], [21, 22, 0, 0], [31, 0, 0, 0], [41, 42, 43, 44]])
    mask = (ids > 0).long()
    comp = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    p_ids, positions, p_comp = packed_rows(ids, mask, comp)
    # first-fit decreasing into rows of 4: [3] alone, [0, 2] (3 + 1), [1] (2) with a tail of 2
    # the tail: any real id (no loss reads it, and it is a sequence of its own)
    assert p_ids.tolist() == [[41, 42, 43, 44], [11, 12, 13, 31], [21, 22, 11, 11]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert p_comp.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert p_comp.sum() == comp.sum()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_batch_has_the_padded_loss_and_gradient(arch, tokenizer, sharp_policy):
    """The packed forward's loss and gradient are the padded forward's to rounding (sharp weights: attention
    across a packed boundary, a position that does not restart or a shifted label would move them far more)."""
    model = sharp_policy(arch)
    ids, mask, comp = encode_pairs(tokenizer, *ragged(24, seed=1))
    packed = packed_rows(ids, mask, comp)
    assert len(packed[0]) < len(ids)  # fewer rows: padding saved
    losses, grads = [], []
    for loss in (lambda: finetune.completion_nll(model, ids, mask, comp, CPU),
                 lambda: finetune.packed_completion_nll(model, *packed, CPU)):
        model.zero_grad()
        value = loss()
        value.backward()
        losses.append(value.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert (grads[1] - grads[0]).norm() < 1e-4 * grads[0].norm()
    assert check_packing(model, ids, mask) < forward_module.PACKING_TOLERANCE


def test_padding_free_sft_trains_as_padded_and_refuses_a_model_that_mixes_sequences(tokenizer, monkeypatch):
    from dataclasses import replace

    from rlhfkit.core.errors import ConfigError

    data = encode_pairs(tokenizer, *ragged(48, seed=2))
    models = {}
    for free in (False, True):
        models[free] = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
        finetune.fit_completions(models[free], data, epochs=2, batch_size=16, lr=3e-3,
                                 rt=replace(CPU, padding_free=free), generator=torch.Generator().manual_seed(0))
    for a, b in zip(models[False].parameters(), models[True].parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    # a model that ignores the packed bounds (here: an attention mask given, which turns transformers' packed
    # reading off) is refused before training
    real_inputs = forward_module.packed_inputs
    monkeypatch.setattr(forward_module, "packed_inputs", lambda model, p, ids: {
        **real_inputs(model, p, ids), "attention_mask": torch.ones(p.packed_shape, dtype=torch.long)})
    with pytest.raises(ConfigError, match="train.padding_free"):
        finetune.fit_completions(models[False], data, epochs=1, batch_size=16, lr=3e-3,
                                 rt=replace(CPU, padding_free=True), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("chunked", [True, False])
def test_packed_dpo_log_probs_are_the_padded_ones(chunked, tokenizer, sharp_policy, monkeypatch):
    """row_logprobs (DPO, SimPO, ORPO, KTO, and their references) with train.padding_free: each sequence's
    log-prob is the padded forward's to rounding, on the chunked head and on the full-logits path, for a LoRA
    policy's adapter-disabled reference too (whose check must leave the policy in training mode)."""
    from dataclasses import replace

    from rlhfkit.models.lora import AdapterDisabled

    if not chunked:
        monkeypatch.setattr(forward_module, "use_chunked", lambda model, chunk: False)
    model = sharp_policy("gpt2")
    seqs = encode_pairs(tokenizer, *ragged(20, seed=3))
    rows = torch.tensor([4, 0, 7, 11, 2, 19])
    checks = []
    real_check = forward_module.check_packing
    monkeypatch.setattr(forward_module, "check_packing", lambda *a: checks.append(1) or real_check(*a))
    padded = row_logprobs(model, seqs, rows, CPU)
    packed = row_logprobs(model, seqs, rows, replace(CPU, padding_free=True))
    assert torch.equal(row_logprobs(model, seqs, rows, replace(CPU, padding_free=True)), packed)
    assert len(checks) == 1  # once per model, not per batch
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-4)
    assert (padded[1:] - padded[:-1]).abs().min() > 1e-2  # distinct values: a row summed into another would show

    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(sharp_policy("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    policy.train()
    reference = AdapterDisabled(policy)
    assert torch.allclose(row_logprobs(reference, seqs, rows, replace(CPU, padding_free=True)),
                          row_logprobs(reference, seqs, rows, CPU), rtol=1e-5, atol=1e-4)
    assert policy.training and all(m.training for m in policy.modules())


def test_packing_moves_each_real_token_and_back_for_any_padding():
    """Packing (any padding side, holes too): each row's real tokens in order, whole sequences per packed row,
    positions counting only real tokens (as position_ids does for the padded forward); unpack inverts pack on the
    real tokens and leaves padding at `fill`."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 0]])  # left, right, hole
    x = torch.arange(1, 21).reshape(4, 5)
    p = packing(mask)
    # lengths 3, 2, 4, 2 into rows of 4: [2] alone, [0] + room 1, [1, 3]
    assert p.pack(x).tolist() == [[12, 13, 14, 15], [3, 4, 5, 0], [6, 7, 16, 18]]
    assert p.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert p.owner.tolist() == [[2, 2, 2, 2], [0, 0, 0, -1], [1, 1, 3, 3]]
    assert torch.equal(p.unpack(p.pack(x), fill=-1), torch.where(mask.bool(), x, -1))
    y = torch.randn(3, 4, 2, requires_grad=True)  # trailing dimensions, and the gradient flows back
    p.unpack(y).sum().backward()
    assert y.grad[..., 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunked", [True, False])
def test_packed_rollout_passes_are_the_padded_ones(arch, chunked, rollout_batch, sharp_policy, sharp_scalar,
                                                   monkeypatch):
    """forward_response with train.padding_free (the online methods' training passes, and the rollout's policy,
    reference and value passes): log-probs, values and entropy at every response token, and the log-probs'
    gradient, are the padded forward's to rounding, with left-padded queries and right-padded responses."""
    from dataclasses import replace

    if not chunked:
        monkeypatch.setattr(forward_module, "use_chunked", lambda model, chunk: False)
    policy = sharp_policy(arch)
    critic = sharp_scalar(policy)
    q, qm, r, rm = rollout_batch()
    out = {}
    for free in (False, True):
        policy.zero_grad()
        logprobs, values, entropy = forward_response(policy, critic, q, qm, r, rm, 0.7, replace(CPU, padding_free=free),
                                                     with_entropy=True)
        (logprobs * rm).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
        out[free] = [v * rm for v in (logprobs, values, entropy)] + [grad]
    for padded, packed in zip(out[False][:3], out[True][:3]):
        assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-4)
    assert (out[True][3] - out[False][3]).norm() < 1e-4 * out[False][3].norm()
    assert out[False][0][rm.bool()].std() > 0.5 and out[False][1][rm.bool()].std() > 0.1  # values a bug would move


def test_packed_reward_model_scores_are_the_padded_ones(tokenizer, sharp_policy, sharp_scalar, monkeypatch, tmp_path):
    """The reward model with train.padding_free: each comparison's two scores (pair_scores), each ranked
    completion's (ranking_scores) and the scores of a reward model directory read by the online methods
    (RewardModelScorer) are the padded ones to rounding; a scalar model that attends across packed sequences is
    refused."""
    from dataclasses import replace

    from rlhfkit.core.errors import ConfigError

    scorer = sharp_scalar(sharp_policy("gpt2"))
    prompts, completions = ragged(24, seed=5)
    data = encode_comparisons(tokenizer, [Comparison(f"i{i}", prompts[i], completions[i], completions[(i + 5) % 24])
                                          for i in range(24)])
    idx = torch.tensor([3, 0, 17, 9, 21])
    free = replace(CPU, padding_free=True)
    calls = []
    real = forward_module.packed_inputs
    monkeypatch.setattr(forward_module, "packed_inputs", lambda *a: calls.append(1) or real(*a))
    padded, packed = pair_scores(scorer, data, idx, CPU), pair_scores(scorer, data, idx, free)
    assert calls  # the packed forward, not the padded one
    for a, b in zip(padded, packed):
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-5)
    assert (padded[0] - padded[1]).abs().min() > 1e-2  # chosen and rejected apart: a swap would show
    items = [RankedItem(f"i{i}", prompts[i], [completions[i], completions[i + 1], "4"], [[[0], [1], [2]]], "")
             for i in range(6)]
    ranked = encode_ranked_items(tokenizer, items)
    calls.clear()
    grids = [ranking_scores(scorer, ranked, torch.tensor([1, 4, 2]), rt)[0] for rt in (CPU, free)]
    assert calls
    assert torch.allclose(grids[1], grids[0], rtol=1e-5, atol=1e-5)
    # the reward model scoring sampled text (the online methods, the evaluation) reads its rows packed too
    from rlhfkit.models.scoring import RewardModelScorer

    scorer.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    calls.clear()
    texts = [prompts[:8], completions[:8]]
    scored = [RewardModelScorer(tmp_path / "rm", rt)(*texts) for rt in (CPU, free)]
    assert calls and torch.allclose(scored[1], scored[0], rtol=1e-5, atol=1e-5)
    crossing = sharp_scalar(sharp_policy("gpt2"), seed=3)
    monkeypatch.setattr(forward_module, "packed_inputs", lambda model, p, ids: {
        **real(model, p, ids), "attention_mask": torch.ones(p.packed_shape, dtype=torch.long)})
    with pytest.raises(ConfigError, match="train.padding_free"):
        pair_scores(crossing, data, idx, free)
