"""Batches cut to their own longest row (rlhfkit.data.batching.used_columns): the offline trainers' data is padded
to the longest sequence of the whole dataset, and SFT, the reward model and the DPO family forward only the
columns some row of the batch uses, as a collator padding each batch would. The figures are the untrimmed ones to
float rounding (the columns cut hold only padding)."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.reward import encode_comparisons, pair_scores, ranking_scores
from rlhfkit.data.batching import encode_pairs, used_columns
from rlhfkit.data.contract import Comparison
from rlhfkit.data.ranked import RankedItem, encode_ranked_items
from rlhfkit.models import forward as forward_module
from rlhfkit.models.forward import row_logprobs, sequence_logprobs
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
                        lambda m, batch, d: widths.append(batch["attention_mask"]) or real_rewards(m, batch, d))
    monkeypatch.setattr(reward_module, "sequence_scores",
                        lambda m, ids, mask: widths.append(mask) or real_scores(m, ids, mask))
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
