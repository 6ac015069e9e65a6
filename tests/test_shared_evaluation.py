"""Under several processes each evaluates its share of the held-out batches and the figures are added up over the
processes (rlhfkit.models.engine.my_share, sum_over_processes, cat_over_processes): SFT's held-out loss, the reward
model's accuracy, DPO's and KTO's figures (pairwise and listwise) and the cached reference's table.

Here two processes are simulated in one, a thread each: dist says world 2 and the thread's rank, and the gather
the helpers call exchanges the threads' objects. Both ranks must then report exactly what one process computes on
the whole set, each having forwarded only its share. The real gloo path runs in tests/test_engine.py (the
2-process SFT, reward-model and DPO runs against one process)."""

import threading

import pytest
import torch

from rlhfkit.algorithms import dpo as dpo_module
from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.dpo import DPOConfig, encode_dpo_pairs, evaluate_dpo, evaluate_listwise, pair_batches
from rlhfkit.algorithms.kto import KTOConfig, encode_thumbs, evaluate_kto
from rlhfkit.algorithms.reward import encode_comparisons, evaluate_pairs
from rlhfkit.core import dist
from rlhfkit.data.batching import encode_pairs
from rlhfkit.data.contract import Comparison, Thumb
from rlhfkit.data.ranked import RankedItem, encode_ranked_items
from rlhfkit.models import engine as engine_module
from rlhfkit.models.engine import my_share, sum_over_processes, working_alone
from rlhfkit.models.reference import Reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine import finetune

CPU = Runtime(torch.device("cpu"), None)


def test_shares_are_contiguous_and_cover_everything(monkeypatch):
    for world in (2, 3, 4):
        for n in (0, 1, 2, 7, 9):
            monkeypatch.setattr(dist, "world_size", lambda w=world: w)
            shares = []
            for r in range(world):
                monkeypatch.setattr(dist, "rank", lambda r=r: r)
                shares.append(my_share(n))
            assert [i for s in shares for i in s] == list(range(n))  # in rank order: the whole, once
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with working_alone():  # a stage the main process runs by itself: no split, no collective
        assert my_share(7) == range(7)
        assert sum_over_processes({"a": 1.0}) == {"a": 1.0}
    monkeypatch.undo()
    assert sum_over_processes({"a": 1.0, "b": 2.0}) == {"a": 1.0, "b": 2.0}  # one process: itself


class TwoRanks:
    """Run a function as both ranks of a simulated world of 2, one thread a rank, the helpers' gather an exchange
    between the threads (a collective one rank makes and the other does not times out instead of hanging). Both
    ranks must return the same figures; the first is returned."""

    def __init__(self, monkeypatch):
        self.local = threading.local()
        self.slots: list = [None, None]
        self.barrier = threading.Barrier(2, timeout=60)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        monkeypatch.setattr(dist, "rank", lambda: self.local.rank)
        monkeypatch.setattr(engine_module, "gather_objects", self.gather)

    def gather(self, obj) -> list:
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # both have read before either writes again
        return everyone

    def run(self, fn):
        results, errors = [None, None], []

        def work(rank):
            self.local.rank = rank
            try:
                results[rank] = fn()
            except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        same = torch.equal(*results) if isinstance(results[0], torch.Tensor) else results[0] == results[1]
        assert same, results
        return results[0]


def words(n, seed, longest=9):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(str(int(d)) for d in torch.randint(0, 10, (int(k),), generator=g))
            for k in torch.randint(1, longest, (n,), generator=g)]


@pytest.fixture
def policy(sharp_policy):
    return sharp_policy("gpt2")


def test_sft_and_reward_model_figures(monkeypatch, tokenizer, policy):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    data = encode_pairs(tokenizer, [p + " =" for p in words(21, 0, 5)], words(21, 1))
    whole = finetune.evaluate_nll(policy, data, 4, CPU)
    seen = []
    real = finetune.completion_nll
    monkeypatch.setattr(finetune, "completion_nll", lambda m, ids, *a: seen.append((dist.rank(), len(ids))) or
                        real(m, ids, *a))
    assert TwoRanks(monkeypatch).run(lambda: finetune.evaluate_nll(policy, data, 4, CPU)) == pytest.approx(whole, rel=1e-12)
    assert sorted(seen) == [(0, 4), (0, 4), (0, 4), (1, 1), (1, 4), (1, 4)]  # 6 batches: 3 a rank
    torch.manual_seed(0)
    scorer = GPT2ForSequenceClassification(GPT2Config(**{**policy.config.to_dict(), "id2label": {0: "score"},
                                                         "pad_token_id": 0})).eval()
    prompts, completions = [p + " =" for p in words(19, 2, 5)], words(19, 3)
    pairs = encode_comparisons(tokenizer, [Comparison(f"i{i}", prompts[i], completions[i], completions[(i + 3) % 19])
                                           for i in range(19)])
    monkeypatch.undo()
    whole = evaluate_pairs(scorer, pairs, CPU, 4)
    assert 0.2 < whole["accuracy"] < 0.8  # neither all nor none: a share's accuracy would differ
    forwarded = []
    real_scores = reward_module.pair_scores
    monkeypatch.setattr(reward_module, "pair_scores", lambda m, d, idx, rt: forwarded.append((dist.rank(), len(idx)))
                        or real_scores(m, d, idx, rt))
    split = TwoRanks(monkeypatch).run(lambda: evaluate_pairs(scorer, pairs, CPU, 4))
    assert split == pytest.approx(whole, rel=1e-12)
    assert sorted(forwarded) == [(0, 4), (0, 4), (0, 4), (1, 3), (1, 4)]  # 5 batches: rank 0 the first 3


def test_dpo_kto_and_reference_table_figures(monkeypatch, tokenizer, policy, sharp_policy):
    prompts, completions = [p + " =" for p in words(13, 4, 5)], words(26, 5)
    data = encode_dpo_pairs(tokenizer, [Comparison(f"i{i}", prompts[i], completions[i], completions[13 + i])
                                        for i in range(13)])
    dc = DPOConfig()
    reference = Reference(model=sharp_policy("gpt2", seed=7))
    table = reference.table_of(data, pair_batches(data, 3), CPU)
    whole = evaluate_dpo(policy, data, reference, "heldout", dc, CPU, 3)
    two = TwoRanks(monkeypatch)
    assert two.run(lambda: evaluate_dpo(policy, data, reference, "heldout", dc, CPU, 3)) == pytest.approx(whole, rel=1e-12)
    before = reference.forwards
    assert torch.equal(two.run(lambda: reference.table_of(data, pair_batches(data, 3), CPU)), table)
    assert reference.forwards - before == len(pair_batches(data, 3))  # each batch forwarded once over both ranks

    thumbs = [Thumb(f"i{i}", prompts[i], completions[i], i % 3 != 0) for i in range(13)]
    seqs, labels = encode_thumbs(tokenizer, thumbs, seed=0)
    kc = KTOConfig()
    monkeypatch.undo()
    whole = evaluate_kto(policy, seqs, labels, reference, "heldout", kc, CPU, batch_size=4)
    ref_forwards = []
    real_forward = Reference.forward
    monkeypatch.setattr(Reference, "forward", lambda self, s, rows, rt: ref_forwards.append(dist.rank()) or
                        real_forward(self, s, rows, rt))
    split = TwoRanks(monkeypatch).run(lambda: evaluate_kto(policy, seqs, labels, reference, "heldout", kc, CPU,
                                                           batch_size=4))
    assert split == pytest.approx(whole, rel=1e-12)
    assert sorted(ref_forwards) == [0, 0, 1, 1]  # the reference's 4 batches, 2 a rank

    items = [RankedItem(f"i{i}", prompts[i], [completions[i], completions[i + 1], completions[i + 2]],
                        [[[0], [2], [1]]], "") for i in range(9)]
    ranked = encode_ranked_items(tokenizer, items)
    pairs_rows = ranked.rows[:, [0, 1]]  # (9, 2): each item's best completion against its worst
    monkeypatch.undo()
    rows_forwarded = []
    real = dpo_module.row_logprobs
    lc = DPOConfig(loss="plackett_luce")
    whole = evaluate_listwise(policy, ranked, pairs_rows, reference, "heldout", lc, CPU, rows_per_forward=5)
    monkeypatch.setattr(dpo_module, "row_logprobs", lambda m, s, r, rt: rows_forwarded.append((dist.rank(), len(r)))
                        or real(m, s, r, rt))
    split = TwoRanks(monkeypatch).run(lambda: evaluate_listwise(policy, ranked, pairs_rows, reference, "heldout", lc,
                                                                CPU, rows_per_forward=5))
    assert split == pytest.approx(whole, rel=1e-12)
    assert sorted(rows_forwarded) == [(0, 5), (0, 5), (0, 5), (1, 2), (1, 5), (1, 5)]  # 27 rows, 6 forwards


def test_a_main_process_stage_works_alone(monkeypatch, tmp_path):
    """The stages the main process runs by itself (feedback, evaluation, SL-CAI, the toxicity classifier) run in
    working_alone, so that an evaluation inside them (SL-CAI's held-out loss) does not wait for processes that are
    not there; the distributed ones do not."""
    from rlhfkit.pipeline import stages
    from rlhfkit.pipeline.config import load_config

    seen = {}

    def run(name, *args):
        seen[name] = engine_module._ALONE
        return {}

    monkeypatch.setattr(stages, "_require", lambda *a: None)
    monkeypatch.setattr(stages, "_run", run)
    monkeypatch.setattr(stages, "build_summary", lambda *a: {})
    cfg = load_config(overrides=["device='cpu'"])
    for name in ("feedback", "sft", "eval"):
        stages.run_stage(name, cfg, tmp_path / "out")
    assert seen == {"feedback": True, "sft": False, "eval": True}
    assert engine_module._ALONE is False
