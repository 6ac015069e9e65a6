"""Training steps on sequences of varying length, three ways (issue 18, "padding-free packing"):

    whole     every batch as wide as the longest sequence of the whole dataset (SFT and the reward model before)
    trimmed   every batch cut to its own longest row (rlhfkit.data.batching.used_columns: now always on)
    packed    train.padding_free = true: each batch's sequences back to back in rows of its longest (Packing)

    .venv/bin/python benchmarks/padding_free.py [--loss sft|dpo|rm|ppo] [--steps 12] [--reps 3] [--threads 2]
        [--width 256] [--layers 4]

The data: `--steps` x `--batch` (prompt, completion) pairs of digit words (384 by default), prompts of 8-24 tokens,
completions long-tailed like chat replies (lognormal: median ~60 tokens, cut at 400); a GPT-2 of `--layers` x
`--width` (fp32, AdamW), the same model and batches for every mode (`--loss dpo`: DPO's forward, the sequence
log-probs of each batch's rows on the chunked head, and its backward, in place of SFT's loop; `--loss rm`: the
reward model's pairwise step, pair_scores and the Bradley-Terry loss, each completion paired with the next one's;
`--loss ppo`: an online method's training pass, forward_response's log-probs and a value model's values on
rollout-shaped rows, the prompt left-padded and the completion right-padded to the batch's longest as the sampler
returns them (its "whole" and "trimmed" are that one layout), and their backward), the modes
interleaved `--reps` times in this process. Printed per mode: the median time per optimiser step and its range,
real tokens per second, and the share of the computed tokens (rows x columns forwarded) that are real; and the
mean loss of the steps, equal across the modes to float rounding (they compute the same update). Results in
README, "Against TRL".
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms.reward import EncodedComparisons, pair_scores
from rlhfkit.data.batching import encode_pairs, packing, pad_left, pad_right, used_columns
from rlhfkit.models import forward as forward_module
from rlhfkit.models.forward import forward_response
from rlhfkit.ops.losses import bradley_terry_loss
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine import finetune
from rlhfkit.spine.epochs import LoopOptions
from rlhfkit.tasks import get_task


def data(n: int, seed: int, tokenizer):
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(n):
        prompts.append(" ".join(str(rng.randrange(10)) for _ in range(rng.randrange(8, 25))))
        length = min(400, max(4, int(rng.lognormvariate(4.1, 0.7))))
        completions.append(" ".join(str(rng.randrange(10)) for _ in range(length)))
    return encode_pairs(tokenizer, prompts, completions)


def rollout(ids, mask, comp, rows):
    """Rows `rows` as a sampler returns them: (queries, query mask) left-padded, (responses, response mask)
    right-padded, each to the batch's longest."""
    lengths, prompt_lengths = mask[rows].sum(1), (mask[rows] - comp[rows]).sum(1)
    prompts = [ids[i, :n].tolist() for i, n in zip(rows.tolist(), prompt_lengths.tolist())]
    replies = [ids[i, p:n].tolist() for i, p, n in zip(rows.tolist(), prompt_lengths.tolist(), lengths.tolist())]
    return (*pad_left(prompts, 0), *pad_right(replies, 0))


def scalar_model(policy):
    """A GPT-2 sequence classifier of the policy's shape: the value model (or the reward model)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(**{**policy.config.to_dict(), "id2label": {0: "score"},
                                                       "pad_token_id": 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loss", choices=("sft", "dpo", "rm", "ppo"), default="sft",
                    help="SFT's loop; DPO's forward (sequence log-probs of the batch's rows) and backward; the reward "
                         "model's pairwise step; an online method's log-prob and value pass and backward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = get_task("digits").build_tokenizer()
    ids, mask, comp = data(args.steps * args.batch, 0, tokenizer)
    real = int(mask.sum())
    print(f"{len(ids)} sequences, {real} tokens, longest {ids.shape[1]}; GPT-2 {args.layers} x {args.width}, batch "
          f"{args.batch}, {args.steps} steps, {args.threads} threads")
    whole_width = lambda m: m.shape[1]  # noqa: E731
    modes = {"whole": (False, whole_width), "trimmed": (False, used_columns), "packed": (True, used_columns)}
    computed = {}
    for name, (free, columns) in modes.items():
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))  # the loop's first epoch
        batches = [order[s * args.batch : (s + 1) * args.batch] for s in range(args.steps)]
        if args.loss == "rm":  # each completion with the next one's, in one forward
            batches = [torch.cat([b, (b + 1) % len(ids)]) for b in batches]
        if args.loss == "ppo":
            masks = [torch.cat([qm, rm_], 1) for _, qm, _, rm_ in (rollout(ids, mask, comp, b) for b in batches)]
            computed[name] = sum(packing(m).positions.numel() if free else m.numel() for m in masks)
        elif free:
            computed[name] = sum(packing(mask[b]).positions.numel() for b in batches)
        else:
            computed[name] = sum(len(b) * columns(mask[b]) for b in batches)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    batches = [order[s * args.batch : (s + 1) * args.batch] for s in range(args.steps)]
    if args.loss == "rm":
        batches = [torch.cat([b, (b + 1) % len(ids)]) for b in batches]
    times: dict[str, list[float]] = {name: [] for name in modes}
    losses: dict[str, float] = {}
    for _ in range(args.reps):
        for name, (free, columns) in modes.items():
            finetune.used_columns = columns
            model = build_tiny_policy(TinyModelSpec("gpt2", args.layers, args.width, 4, ids.shape[1] + 8), tokenizer,
                                      seed=0)
            steps = []

            class Stamp:
                def on_step(self, step, metrics):
                    steps.append((time.perf_counter(), float(metrics["loss/sft"])))

            rt = Runtime(torch.device("cpu"), None, padding_free=free)
            start = time.perf_counter()
            if args.loss == "sft":
                finetune.fit_completions(model, (ids, mask, comp), epochs=1, batch_size=args.batch, lr=1e-3, rt=rt,
                                         generator=torch.Generator().manual_seed(0),
                                         options=LoopOptions(callbacks=[Stamp()]))
            elif args.loss in ("rm", "ppo"):
                reward_module.used_columns = columns
                scalar = scalar_model(model)
                params = list(model.parameters()) + list(scalar.parameters())
                optimizer = torch.optim.AdamW(params, lr=1e-4)
                if args.loss == "rm":
                    encoded = EncodedComparisons({"input_ids": torch.cat([ids, ids.roll(-1, 0)]),  # chosen, rejected
                                                  "attention_mask": torch.cat([mask, mask.roll(-1, 0)])},
                                                 torch.zeros(len(ids)), True, torch.ones(len(ids)))
                for rows in batches:
                    optimizer.zero_grad()
                    if args.loss == "rm":
                        loss = bradley_terry_loss(*pair_scores(scalar, encoded, rows[: args.batch], rt))[0]
                    else:
                        q, qm, r, rm_ = rollout(ids, mask, comp, rows)
                        logprobs, values, _ = forward_response(model, scalar, q, qm, r, rm_, 1.0, rt)
                        loss = -(logprobs * rm_).sum() / rm_.sum() / 100 + ((values * rm_) ** 2).sum() / rm_.sum()
                    loss.backward()
                    optimizer.step()
                    Stamp().on_step(0, {"loss/sft": loss.detach()})
                reward_module.used_columns = used_columns
            else:  # DPO's forward: the sequence log-probs of a batch's rows (rlhfkit.models.forward.row_logprobs)
                forward_module.used_columns = columns
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                for rows in batches:
                    optimizer.zero_grad()
                    loss = -forward_module.row_logprobs(model, (ids, mask, comp), rows, rt).mean() / 100
                    loss.backward()
                    optimizer.step()
                    Stamp().on_step(0, {"loss/sft": loss.detach()})
                forward_module.used_columns = used_columns
            ends = [start] + [t for t, _ in steps]
            times[name].append(statistics.median(b - a for a, b in zip(ends[1:], ends[2:])))  # after the first
            losses[name] = statistics.fmean(loss for _, loss in steps)
    finetune.used_columns = used_columns
    real = sum(int(mask[b].sum()) for b in batches)  # the tokens the steps read (the reward model: each twice)
    base = statistics.median(times["whole"])
    print("| mode | s / step (median [range]) | real tokens / s | real share of computed tokens | vs whole | mean loss |")
    print("|---|---|---|---|---|---|")
    for name in modes:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} [{min(times[name]):.3f}-{max(times[name]):.3f}] | {real / args.steps / t:,.0f} | "
              f"{real / computed[name]:.0%} | {base / t:.2f}x | {losses[name]:.6f} |")


if __name__ == "__main__":
    main()
