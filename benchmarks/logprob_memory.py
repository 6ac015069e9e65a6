"""Peak memory and time of one DPO training step, full-logits log-probs vs the chunked path (rlhfkit/models/forward.py).

    .venv/bin/python benchmarks/logprob_memory.py [--layers 30] [--pairs 8] [--tokens 256] [--reps 3] [--lora]
        [--checkpointing] [--micro-batches 2] [--precision bf16] [--paths chunked]

One step = the policy's sequence log-probs of chosen and rejected in one forward (2 x pairs rows, right-padded as
encode_pairs makes them), the DPO loss against fixed reference log-probs, and the backward; no optimiser step. The
model is a random-init Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49,152, tied embeddings), fp32 on CPU unless --precision bf16 (bf16 autocast, what precision = "auto"
picks for this model on a CPU with bf16 instructions; CUDA when present: then bf16 autocast and torch's peak
allocated memory). --checkpointing turns on the body's gradient checkpointing (train.gradient_checkpointing,
rlhfkit.models.engine.enable_checkpointing). Each measurement runs in a fresh process, the two paths interleaved, `reps` times each; printed: medians
and ranges.

Memory on CPU is resident memory (RSS): `peak RSS` is the process's high-water mark (getrusage ru_maxrss: weights,
activations, gradients, the Python runtime); `step peak - before` is that mark minus the RSS just before the timed
steps (what the step itself adds; valid because the step's peak is far above the model-building peak). Time is the
wall time of the second of two steps (the first warms the allocator).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.forward import disable_dropout, sequence_logprobs

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = disable_dropout(LlamaForCausalLM(config)).to(device).train()
    if args.lora:
        from types import SimpleNamespace

        from rlhfkit.models.lora import wrap_lora

        model = wrap_lora(model, SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=[]), ".", seed=0)
    if args.checkpointing:
        from rlhfkit.models.engine import enable_checkpointing, is_checkpointing

        enable_checkpointing(model)
        assert is_checkpointing(model)

    # 2 x pairs rows (chosen, rejected) of up to `tokens` tokens: prompts of 32-128 tokens, rows ragged by up to 64
    g = torch.Generator().manual_seed(1)
    B, T = 2 * args.pairs, args.tokens
    ids = torch.randint(3, 49152, (B, T), generator=g)
    lengths = T - torch.randint(0, 65, (B,), generator=g)
    prompts = torch.randint(32, 129, (args.pairs,), generator=g).repeat(2)  # a pair shares its prompt
    ar = torch.arange(T)
    mask = (ar < lengths[:, None]).long()
    completion_mask = ((ar >= prompts[:, None]) & (ar < lengths[:, None])).long()
    ids = ids.masked_fill(mask == 0, 2)
    ids, mask, completion_mask = (t.to(device) for t in (ids, mask, completion_mask))
    ref = -torch.rand(B, generator=g).to(device) * 100 - 800  # fixed reference log-probs
    chunk = 0 if args.path == "full" else None  # None: the default, LOGPROB_CHUNK
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        """One optimiser step's gradients, in `micro_batches` forward/backward passes over equal shares of the pairs
        (each pair's chosen and rejected rows together), each loss weighted by its share: the gradient of the mean
        over all pairs, as train.gradient_accumulation_steps computes it."""
        model.zero_grad(set_to_none=True)
        total = 0.0
        for pairs in torch.arange(args.pairs).tensor_split(args.micro_batches):
            rows = torch.cat([pairs, pairs + args.pairs]).to(device)  # chosen rows, then their rejected rows
            with autocast:
                logps = sequence_logprobs(model, ids[rows], mask[rows], completion_mask[rows], chunk=chunk)
            n = len(pairs)
            margin = (logps[:n] - ref[rows[:n]]) - (logps[n:] - ref[rows[n:]])
            loss = -F.logsigmoid(0.1 * margin).sum() / args.pairs
            loss.backward()
            total += loss.item()
        return total

    before = rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated() / 2**20
    loss = step()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"path": args.path, "loss": loss, "step_s": seconds, "rss_before_mib": before,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "scored_positions": int(completion_mask[:, 1:].sum())}
    out["step_peak_minus_before_mib"] = out["peak_rss_mib"] - before
    if device.type == "cuda":
        out["cuda_peak_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_step_peak_minus_before_mib"] = out["cuda_peak_alloc_mib"] - base_alloc
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r = 8) instead of every weight")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the body")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="split the pairs into this many forward/backward passes (gradient accumulation)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype on CPU")
    parser.add_argument("--paths", default="full,chunked", help="which log-prob paths to run (comma-separated)")
    parser.add_argument("--path", choices=["full", "chunked"], help=argparse.SUPPRESS)  # set for a worker process
    args = parser.parse_args()
    if args.path is not None:
        print(json.dumps(worker(args)))
        return 0
    rows: dict[str, list[dict]] = {p: [] for p in args.paths.split(",")}
    for rep in range(args.reps):
        for path in rows:  # interleaved, each a fresh process
            cmd = [sys.executable, __file__, "--path", path] + [a for a in sys.argv[1:]]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"rep {rep + 1} {path}: {rows[path][-1]}", file=sys.stderr, flush=True)
    keys = [("peak_rss_mib", "peak RSS (MiB)"), ("step_peak_minus_before_mib", "step peak - before (MiB)"),
            ("step_s", "step time (s)")]
    first = next(iter(rows.values()))[0]
    if "cuda_peak_alloc_mib" in first:
        keys += [("cuda_peak_alloc_mib", "CUDA peak allocated (MiB)")]
    both = list(rows) == ["full", "chunked"]
    setting = (f"{'LoRA r=8' if args.lora else 'full fine-tuning'}, {args.layers} layers, {args.pairs} pairs x "
               f"{args.tokens} tokens, {first['scored_positions']} scored positions, {args.precision}"
               f"{', gradient checkpointing' if args.checkpointing else ''}"
               f"{f', {args.micro_batches} micro-batches' if args.micro_batches > 1 else ''}, {args.threads} threads")
    print(f"| DPO step ({setting}) | {' | '.join(rows)} |{' chunked / full |' if both else ''}")
    print("|---|" + "---|" * (len(rows) + both))
    for key, label in keys:
        fmt = ".2f" if key == "step_s" else ".0f"
        med = {p: statistics.median(r[key] for r in rows[p]) for p in rows}
        cells = [f"{med[p]:{fmt}} ({min(r[key] for r in rows[p]):{fmt}}-{max(r[key] for r in rows[p]):{fmt}})"
                 for p in rows]
        ratio = f" {med['chunked'] / med['full']:.2f} |" if both else ""
        print(f"| {label}, median (range) | {' | '.join(cells)} |{ratio}")
    if both:
        print(f"losses equal: {[r['loss'] for r in rows['full']] == [r['loss'] for r in rows['chunked']]} "
              f"({rows['full'][0]['loss']!r} / {rows['chunked'][0]['loss']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
