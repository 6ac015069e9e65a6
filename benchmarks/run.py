"""Speed of rlhfkit's hot paths, as ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/run.py [--quick]

1. Sampling: rlhfkit's batched KV-cache sampler vs (a) recomputing the whole prefix every token and
   (b) transformers' `generate(do_sample=True)`, same model, batch and length.
2. Reward model: chosen + rejected in one forward vs two forwards.
3. Training throughput: SFT steps of a small GPT-2 as achieved FLOP/s vs this machine's fp32 matmul peak
   (a large torch.mm), using the 6 * parameters * tokens estimate (Kaplan et al. 2020).
"""

from __future__ import annotations

import argparse
import time

import torch

from rlhfkit.data.batching import encode_pairs, encode_prompts
from rlhfkit.models.forward import causal_logits, position_ids, sequence_scores
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, quiet_transformers
from rlhfkit.models.sampling import sample
from rlhfkit.tasks import get_task


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def naive_sample(model, q, qm, n_new):
    ids, mask = q, qm
    for _ in range(n_new):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 2 if args.quick else 5
    quiet_transformers()
    task = get_task("digits")
    tok = task.build_tokenizer()
    torch.manual_seed(0)
    rows = []

    # 1. Sampling: 64 new tokens for 64 prompts from a 4-layer, 256-wide GPT-2 (long enough for the cache to matter).
    model = build_tiny_policy(TinyModelSpec("gpt2", 4, 256, 4, 128), tok, seed=0).eval()
    prompts = task.prompts(64, __import__("random").Random(0))
    q, qm = encode_prompts(tok, prompts)
    n_new = 64
    ours = timeit(lambda: sample(model, q, qm, max_new_tokens=n_new, eos_token_id=-1, pad_token_id=tok.pad_token_id), repeat)
    naive = timeit(lambda: naive_sample(model, q, qm, n_new), repeat)
    gen = timeit(lambda: model.generate(input_ids=q, attention_mask=qm, do_sample=True, max_new_tokens=n_new,
                                        min_new_tokens=n_new, pad_token_id=tok.pad_token_id), repeat)
    rows += [("sampling: rlhfkit KV-cache sampler", ours, 1.0),
             ("sampling: recompute prefix every token", naive, naive / ours),
             ("sampling: transformers generate()", gen, gen / ours)]

    # 2. Reward model forward: chosen + rejected in one pass vs two.
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_config(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1})).eval()
    demos = task.demonstrations(128, __import__("random").Random(1))  # 64 pairs: the default RM batch
    ids, mask, _ = encode_pairs(tok, [p for p, _ in demos], [c for _, c in demos])
    half = len(ids) // 2
    with torch.no_grad():
        one = timeit(lambda: sequence_scores(rm, ids, mask), repeat * 4)
        two = timeit(lambda: (sequence_scores(rm, ids[:half], mask[:half]), sequence_scores(rm, ids[half:], mask[half:])), repeat * 4)
    rows += [("reward: chosen+rejected in one forward", one, 1.0), ("reward: two forwards", two, two / one)]

    # 3. Training throughput vs matmul peak.
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = timeit(lambda: torch.mm(a, b), repeat)
    peak = 2 * n**3 / mm
    big = build_tiny_policy(TinyModelSpec("gpt2", 4, 256, 4, 128), tok, seed=0).train()
    opt = torch.optim.AdamW(big.parameters(), lr=1e-4)
    batch = torch.randint(4, len(tok), (32, 128))
    bmask = torch.ones_like(batch)

    def step():
        logits = causal_logits(big, batch, bmask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = timeit(step, repeat)
    n_params = sum(p.numel() for p in big.parameters())
    achieved = 6 * n_params * batch.numel() / t
    rows += [("matmul peak fp32 (2048^3 mm)", mm, 1.0)]

    print(f"{'benchmark':<44}{'seconds':>10}{'ratio':>10}")
    for name, secs, ratio in rows:
        print(f"{name:<44}{secs:>10.4f}{ratio:>9.2f}x")
    print(f"\nmatmul peak: {peak / 1e9:.1f} GFLOP/s; SFT training step: {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / peak:.0%} of peak ({n_params / 1e6:.2f}M params, {batch.numel()} tokens, {t * 1e3:.0f} ms/step)")
    print("ratios > 1 mean the baseline is that many times slower than rlhfkit's path")


if __name__ == "__main__":
    main()
