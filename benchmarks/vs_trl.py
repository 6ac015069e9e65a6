"""rlhfkit against TRL on the same workloads: throughput, share of the measured matmul peak, and peak memory.

    .venv/bin/python benchmarks/vs_trl.py --quick          # a few minutes on a 2-core CPU: 1 repetition, short runs
    .venv/bin/python benchmarks/vs_trl.py                  # 3 interleaved repetitions: medians and ranges
    .venv/bin/python benchmarks/vs_trl.py --workloads dpo --reps 5 --threads 2

Each measurement is one side (rlhfkit or TRL) on one workload in a fresh process, the sides interleaved
(rlhfkit, TRL, rlhfkit, TRL, ...) so that a machine that drifts slows both alike. Both sides get the same model
(a random-init GPT-2 built here from a config and saved with save_pretrained: `--layers`, `--width`, `--vocab`),
the same tokenizer (word-level, built here with the `tokenizers` library, so that a word is a token and both sides
see exactly the same lengths), the same records, batch, lengths, steps, learning rate, optimiser (AdamW), precision
(`--precision`: fp32 by default on CPU, bf16 autocast on CUDA; `--precision bf16` on a CPU with bf16 instructions
is rlhfkit's `precision = "auto"` there) and thread count; gradient checkpointing off on both; dropout as the model's
config has it (GPT-2's 0.1), each side doing what it does by default (both switch it off for reward models and
DPO).

Workloads (docs: README "Benchmarks"):
- reward:   reward-model training, Bradley-Terry on pairs (rlhfkit.reward_model vs trl.RewardTrainer).
- dpo:      DPO with the reference model run every step (rlhfkit dpo.reference = 'online' vs trl.DPOTrainer's
            default), chosen and rejected of `--pairs` pairs per step.
- grpo:     GRPO episodes (`--pairs` completions a step: `--pairs` / 4 prompts x 4 samples of `--new-tokens` tokens),
            a Python reward function (the share of the reply's words that are "w7"), KL coefficient 0.04 (a reference
            model run every step on both sides), one optimiser step per batch (rlhfkit.grpo vs trl.GRPOTrainer);
            a step is sampling, scoring, the reference's and the policy's forwards and the update.
- rloo:     RLOO episodes, the same as grpo but RLOO's leave-one-out baseline and the KL (0.04) in the reward
            (rlhfkit.rloo vs trl.RLOOTrainer); both sides compute the sampling policy's log-probs for that KL.
- ppo:      PPO episodes (`--pairs` prompts a step, one reply each of `--new-tokens` tokens), the reward a random-init
            GPT-2 sequence classifier (both sides load the same directory) from which the value model starts too,
            KL coefficient 0.05 in the reward (k1, per token), 4 PPO epochs over the batch as one minibatch, GAE
            (gamma 1, lambda 0.95), whitened advantages, no missing-EOS penalty, no stop at EOS on TRL's side
            (rlhfkit.ppo vs trl.experimental.ppo.PPOTrainer, TRL 1.12's); a step is sampling, the policy's,
            reference's, value model's and reward model's forwards, and 4 updates of policy and value model.
            `--ppo-value shared`: rlhfkit's value head on the policy's body (ppo.value_init = 'shared': one network,
            one forward for log-probs and values); TRL 1.12's PPOTrainer has no such option, its side is unchanged.
- `--shared-prefix`: rlhfkit's train.shared_prefix (rows that begin alike forward their common beginning once: a
            pair's prompt in reward and dpo, a group's in grpo and rloo); TRL has no such option, its side is
            unchanged. "% of peak" still counts every row's own tokens (the work a padded forward does), so with it
            rlhfkit's share measures throughput, not the FLOPs it ran.
- sampling: `--prompts` prompts x `--new-tokens` new tokens, temperature 1, no early stop (rlhfkit's sampler vs
            transformers' generate, which TRL's trainers call).
- `--compile`: rlhfkit's sampling.compile (each decoding step through torch.compile over a static KV cache: CUDA
            graphs on a GPU); the warm-up (the first sample, the first steps) absorbs the compile; TRL's side and HF
            `generate` are unchanged.

Throughput is measured on the training steps alone: a callback stamps the time at the end of every optimiser step
(rlhfkit's on_step, TRL's TrainerCallback.on_step_end) and throughput = rows of the steps after the warm-up / their
time; loading, tokenising, caching and the final evaluation are outside it. Peak memory is the whole process's:
resident memory's high-water mark on CPU (getrusage), torch's peak allocated memory on CUDA. The matmul peak is
measured in the parent process (a square fp32/bf16 matmul, best of several); a workload's share of it is its FLOPs
per second (6 x matmul parameters x tokens for a trained forward and backward, 2x for a forward alone, attention
scores included; the LM head at the positions whose log-probs are needed) over that peak.

The last lines, one per workload, are for scripts: `workload=NAME ratio=X.XX peak_mem_ratio=Y.YY` (rlhfkit / TRL:
a ratio above 1 is rlhfkit faster; a peak_mem_ratio below 1 is rlhfkit leaner).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = ("reward", "dpo", "grpo", "rloo", "ppo", "sampling")
ONLINE = ("grpo", "rloo")  # group workloads on prompts, episodes a step (and ppo, one reply a prompt)
PPO_EPOCHS = 4
WORDS = 1000  # distinct words in the texts (< vocab: the rest of the vocabulary is never seen, as in a real model)


# ----------------------------------------------------------------------------------------------------
# The shared setup: model, tokenizer, records

def build_model_dir(path: Path, args) -> None:
    """A random-init GPT-2 and a word-level tokenizer, saved as a model directory both sides load."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(args.vocab - 3)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=args.width, n_layer=args.layers,
                        n_head=max(1, args.width // 64), bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    # the ppo workload's reward model (and its value model's start): a random-init sequence classifier
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(1)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    GPT2ForSequenceClassification(GPT2Config(**fields, num_labels=1)).save_pretrained(reward_dir(path))
    tok.save_pretrained(reward_dir(path))


def reward_dir(model_dir: Path) -> Path:
    return Path(model_dir).parent / "reward"


def text(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def share_of_w7(prompts=None, completions=None, **kwargs) -> list[float]:
    """The grpo workload's reward: the share of a reply's words that are "w7" (both sides call this function)."""
    return [c.split().count("w7") / max(1, len(c.split())) for c in completions]


def prompt_texts(n: int, args) -> list[str]:
    rng = random.Random(1)
    return [text(rng, args.prompt_tokens) for _ in range(n)]


def preference_records(n: int, args) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": text(rng, args.prompt_tokens), "chosen": text(rng, args.completion_tokens),
             "rejected": text(rng, args.completion_tokens)} for _ in range(n)]


def matmul_flops_per_token(args, lm_head: bool) -> float:
    """Forward matmul FLOPs per token: 2 x (the blocks' weights + the LM head's) + attention scores at the mean
    sequence length (QK^T and AV: 4 x layers x T x width per token)."""
    T = args.prompt_tokens + args.completion_tokens
    blocks = 12 * args.layers * args.width ** 2
    head = args.width * args.vocab if lm_head else 0
    return 2 * (blocks + head) + 4 * args.layers * T * args.width


# ----------------------------------------------------------------------------------------------------
# One side of one workload, in this (fresh) process

class StepClock:
    """Stamps the wall time at the end of every optimiser step (both sides' callbacks call `stamp`)."""

    def __init__(self):
        self.times: list[float] = []

    def stamp(self):
        self.times.append(time.perf_counter())

    # rlhfkit's callback interface
    def on_step(self, step, metrics):
        self.stamp()


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_rlhfkit(workload: str, model_dir: Path, out: Path, args, device) -> StepClock:
    import rlhfkit

    clock = StepClock()
    common = {"threads": args.threads, "seed": 0, "device": device.type, "precision": precision(args, device)}
    if args.draw or args.compile:
        common["sampling"] = {**({"draw": args.draw} if args.draw else {}),
                              **({"compile": True} if args.compile else {})}
    if args.shared_prefix:
        common["train"] = {"shared_prefix": True}
    if workload == "reward":
        n = args.pairs * args.steps
        rlhfkit.reward_model(str(model_dir), None, preference_records(n + n // 4, args), out=out, callbacks=[clock],
                             reward={"epochs": 1, "batch_size": args.pairs, "lr": 1e-4, "heldout_fraction": 0.1,
                                     "use_margin": False}, **common)
    elif workload == "dpo":
        n = args.pairs * args.steps
        rlhfkit.dpo(str(model_dir), None, preference_records(n + n // 4, args), out=out, callbacks=[clock],
                    dpo={"epochs": 1, "batch_size": args.pairs, "lr": 1e-5, "reference": "online"}, **common)
    elif workload in ONLINE:
        method = getattr(rlhfkit, workload)  # rlhfkit.grpo or rlhfkit.rloo
        method(str(model_dir), None, prompt_texts(args.pairs // 4 * args.steps, args), reward=share_of_w7, out=out,
               callbacks=[clock], data={"max_new_tokens": args.new_tokens},
               **{workload: {"total_steps": args.steps, "prompts_per_step": args.pairs // 4, "k": 4, "epochs": 1,
                             "minibatch_size": args.pairs, "beta": 0.04, "lr": 1e-6, "checkpoint_every": 10**6}},
               **common)
    elif workload == "ppo":
        rlhfkit.ppo(str(model_dir), None, prompt_texts(args.pairs * args.steps, args), reward=str(reward_dir(model_dir)),
                    out=out, callbacks=[clock], data={"max_new_tokens": args.new_tokens},
                    ppo={"total_steps": args.steps, "rollout_batch_size": args.pairs, "minibatch_size": args.pairs,
                         "ppo_epochs": PPO_EPOCHS, "lr": 1e-6, "kl_coef": 0.05, "missing_eos_penalty": 0.0,
                         "value_init": args.ppo_value, "checkpoint_every": 10**6}, **common)
    return clock


def run_trl(workload: str, model_dir: Path, out: Path, args, device) -> StepClock:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    clock = StepClock()

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.stamp()

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = args.pairs * args.steps
    if workload == "ppo":  # TRL's PPOTrainer takes tokenised prompts, left-padded for generate
        tok.padding_side = "left"
        data = datasets.Dataset.from_list([{"input_ids": tok(p)["input_ids"]}
                                           for p in prompt_texts(args.pairs * args.steps, args)])
    else:
        data = datasets.Dataset.from_list(preference_records(n, args) if workload not in ONLINE else
                                          [{"prompt": p} for p in prompt_texts(args.pairs // 4 * args.steps, args)])
    common = dict(output_dir=str(out), per_device_train_batch_size=args.pairs, max_steps=args.steps, logging_steps=10**6,
                  save_strategy="no", report_to="none", seed=0, gradient_checkpointing=False,
                  bf16=precision(args, device) == "bf16",
                  use_cpu=device.type == "cpu", dataloader_num_workers=0, disable_tqdm=True)
    if workload == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(learning_rate=1e-4, **common), train_dataset=data,
                                processing_class=tok, callbacks=[Stamp()])
    elif workload == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(learning_rate=1e-6, num_generations=4, max_completion_length=args.new_tokens, beta=0.04,
                            temperature=1.0, shuffle_dataset=False, **common)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=share_of_w7, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[Stamp()])
    elif workload == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(learning_rate=1e-6, num_generations=4, max_completion_length=args.new_tokens, beta=0.04,
                            temperature=1.0, shuffle_dataset=False, **common)
        trainer = RLOOTrainer(model=str(model_dir), reward_funcs=share_of_w7, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[Stamp()])
    elif workload == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        common.pop("gradient_checkpointing")
        config = PPOConfig(learning_rate=1e-6, num_ppo_epochs=PPO_EPOCHS, num_mini_batches=1, kl_coef=0.05,
                           kl_estimator="k1", response_length=args.new_tokens, stop_token=None, temperature=1.0,
                           missing_eos_penalty=None, total_episodes=args.pairs * args.steps,
                           local_rollout_forward_batch_size=args.pairs, num_sample_generations=0, **common)

        def scalar(path):
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            model.config.pad_token_id = tok.pad_token_id
            return model

        trainer = PPOTrainer(args=config, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(model_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
                             reward_model=scalar(reward_dir(model_dir)), value_model=scalar(reward_dir(model_dir)),
                             train_dataset=data, callbacks=[Stamp()])
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = DPOTrainer(model=model, args=DPOConfig(learning_rate=1e-5, **common), train_dataset=data,
                             processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return clock


def run_sampling(side: str, model_dir: Path, args, device) -> dict:
    """Seconds per batch of `--prompts` x `--new-tokens` (best of 3 after one warm-up): rlhfkit's sampler or
    transformers' generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.data.batching import encode_prompts
    from rlhfkit.models.sampling import SamplingParams, sample

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    rng = random.Random(0)
    prompts = [text(rng, rng.randint(args.prompt_tokens // 2, args.prompt_tokens)) for _ in range(args.prompts)]
    q, qm = (t.to(device) for t in encode_prompts(tok, prompts))
    if side == "rlhfkit":
        params = SamplingParams(draw=args.draw or "multinomial", compile=args.compile)
        go = lambda: sample(model, q, qm, max_new_tokens=args.new_tokens, eos_token_id=-1,  # noqa: E731
                            pad_token_id=tok.pad_token_id, sampling=params)
    else:
        go = lambda: model.generate(input_ids=q, attention_mask=qm, do_sample=True, max_new_tokens=args.new_tokens,  # noqa: E731
                                    min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id, top_k=0)
    times = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision(args, device) == "bf16"):
        for _ in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            go()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"seconds": min(times[1:]), "rows_per_s": args.prompts * args.new_tokens / min(times[1:])}


def precision(args, device) -> str:
    return args.precision or ("bf16" if device.type == "cuda" else "fp32")


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model_dir = Path(args.model_dir)
    with tempfile.TemporaryDirectory(prefix=f"vs_trl_{args.side}_") as out:
        if args.workload == "sampling":
            result = run_sampling(args.side, model_dir, args, device)
        else:
            run = run_rlhfkit if args.side == "rlhfkit" else run_trl
            clock = run(args.workload, model_dir, Path(out), args, device)
            if len(clock.times) < args.steps:
                raise SystemExit(f"{args.side} {args.workload}: {len(clock.times)} optimiser steps, expected at least "
                                 f"{args.steps} (the records or the batch are off)")
            # rlhfkit holds out a share of items and may have a step more to take: the first `steps` count
            timed = clock.times[args.warmup - 1:args.steps]
            seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
            result = {"seconds": seconds, "rows_per_s": args.pairs / seconds}  # pairs, or grpo's episodes
    result["peak_mem_gib"] = peak_memory_gib(device)
    result["device"] = device.type
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: setup, interleaved fresh processes, the table

def matmul_peak(threads: int, device_name: str, dtype_name: str) -> float:
    """FLOP/s of a square matmul in the run's precision, best of 5: what the hardware gives this process."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def flops_per_row(workload: str, args) -> float:
    T = args.prompt_tokens + args.completion_tokens
    if workload == "reward":  # chosen and rejected, trained: 2 sequences x 3 x forward (no LM head)
        return 2 * T * 3 * matmul_flops_per_token(args, lm_head=False)
    if workload == "dpo":  # chosen and rejected through the policy (trained) and the reference (forward); the LM head
        # is needed at the completion's positions only (what a side computes beyond that is its own overhead)
        per_sequence = T * matmul_flops_per_token(args, lm_head=False) + args.completion_tokens * 2 * args.width * args.vocab
        return 2 * 4 * per_sequence
    if workload == "ppo":  # an episode: sampled (forward); the policy (old log-probs) and the reference, with the
        # LM head at the reply's positions; the value and reward models (no head); PPO_EPOCHS updates of the policy
        # (3x forward, head) and the value model (3x forward); a value head on the policy's body: no value model
        T = args.prompt_tokens + args.new_tokens
        body, head = matmul_flops_per_token(args, lm_head=False), 2 * args.width * args.vocab
        with_head = (2 + 3 * PPO_EPOCHS) * (T * body + args.new_tokens * head)
        without = 1 if args.ppo_value == "shared" else 2 + 3 * PPO_EPOCHS
        return args.new_tokens * matmul_flops_per_token(args, lm_head=True) + with_head + without * T * body
    if workload in ONLINE:  # an episode: prompt + reply through the policy (sampled: forward; trained: 3x forward)
        # and the reference (forward); rloo: the sampling policy's forward too (its KL is in the reward); the LM head
        # at the reply's positions
        per_token = matmul_flops_per_token(args, lm_head=True)
        T = args.prompt_tokens + args.new_tokens
        passes = 3 + 1 + (workload == "rloo")
        return args.new_tokens * per_token + passes * (T * matmul_flops_per_token(args, lm_head=False)
                                                       + args.new_tokens * 2 * args.width * args.vocab)
    # sampling: one new token's forward (the prompt's prefill is amortised over the new tokens)
    return matmul_flops_per_token(args, lm_head=True)


def measure(side: str, workload: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--workload", workload, "--model-dir", str(model_dir)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("threads", "layers", "width", "vocab", "pairs", "steps", "warmup", "prompt_tokens",
                     "completion_tokens", "prompts", "new_tokens", "precision", "draw", "ppo_value")
            and v is not None]
    cmd += ["--cpu"] if args.cpu else []
    cmd += ["--shared-prefix"] if args.shared_prefix else []
    cmd += ["--compile"] if args.compile else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{side} {workload} failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt(values: list[float], digits: int = 2) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f}" + (f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, shorter runs (a few minutes on 2 CPU cores)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3, --quick 1)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cpu", action="store_true", help="CPU even where CUDA is present")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="both sides (bf16: autocast); default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--draw", choices=("multinomial", "inverse_cdf"), default=None,
                   help="rlhfkit's [sampling] draw (default: rlhfkit's default, torch.multinomial as HF generate)")
    p.add_argument("--compile", action="store_true",
                   help="rlhfkit's [sampling] compile: each decoding step through torch.compile over a static KV cache "
                        "(CUDA graphs on a GPU); the warm-up absorbs the compile; TRL's side is unchanged")
    p.add_argument("--ppo-value", choices=("reward", "shared"), default="reward",
                   help="rlhfkit's ppo.value_init: a value model started from the reward model (as TRL's), or a "
                        "value head on the policy's body")
    p.add_argument("--shared-prefix", action="store_true",
                   help="rlhfkit's train.shared_prefix: rows that begin alike (a pair's prompt, a group's) forward "
                        "their common beginning once; TRL has no such option, its side is unchanged")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--pairs", type=int, default=16, help="pairs per optimiser step (reward, dpo)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 10, --quick 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32, help="sampling: prompts per batch")
    p.add_argument("--new-tokens", type=int, default=64, help="sampling: new tokens per prompt")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    args.reps = args.reps or (1 if args.quick else 3)
    args.steps = args.steps or (6 if args.quick else 10)
    if args.steps <= args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1 (two timed step ends at least)")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    args.precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    peak = matmul_peak(args.threads, device, args.precision)
    print(f"device {device}, {args.threads} threads, {args.precision}; measured matmul peak {peak / 1e9:.1f} GFLOP/s; model GPT-2 "
          f"{args.layers} layers x {args.width}, vocabulary {args.vocab}; {args.prompt_tokens}+{args.completion_tokens}"
          f" tokens; {args.pairs} pairs/step, {args.steps} steps ({args.warmup} warm-up); {args.reps} repetition(s)"
          f"; rlhfkit's draw {args.draw or 'multinomial (default)'}"
          + (f", PPO value {args.ppo_value}" if "ppo" in args.workloads else "")
          + (", rlhfkit's train.shared_prefix on" if args.shared_prefix else "")
          + (", rlhfkit's sampling.compile on" if args.compile else ""),
          flush=True)
    results: dict = {(w, s): [] for w in workloads for s in ("rlhfkit", "trl")}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        model_dir = Path(tmp) / "model"
        build_model_dir(model_dir, args)
        for rep in range(args.reps):
            for w in workloads:
                for side in ("rlhfkit", "trl") if rep % 2 == 0 else ("trl", "rlhfkit"):
                    r = measure(side, w, model_dir, args)
                    results[w, side].append(r)
                    print(f"  rep {rep + 1} {w:8s} {side:7s} {r['rows_per_s']:9.2f} rows/s  peak {r['peak_mem_gib']:.2f} GiB",
                          flush=True)

    unit = {"reward": "pairs/s", "dpo": "pairs/s", "grpo": "episodes/s", "rloo": "episodes/s", "ppo": "episodes/s",
            "sampling": "tokens/s"}
    print(f"\n| workload | rlhfkit | TRL / HF | ratio | % of matmul peak (rlhfkit / TRL) | peak memory GiB (rlhfkit / TRL) |")
    print("|---|---|---|---|---|---|")
    summary = []
    for w in workloads:
        ours, theirs = results[w, "rlhfkit"], results[w, "trl"]
        ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(ours, theirs)]
        mem = [a["peak_mem_gib"] / b["peak_mem_gib"] for a, b in zip(ours, theirs)]
        share = lambda rs: fmt([100 * r["rows_per_s"] * flops_per_row(w, args) / peak for r in rs], 1)  # noqa: E731
        print(f"| {w} ({unit[w]}) | {fmt([r['rows_per_s'] for r in ours])} | {fmt([r['rows_per_s'] for r in theirs])} "
              f"| {fmt(ratios)} | {share(ours)} / {share(theirs)} | {fmt([r['peak_mem_gib'] for r in ours])} / "
              f"{fmt([r['peak_mem_gib'] for r in theirs])} |")
        summary.append(f"workload={w} ratio={statistics.median(ratios):.2f} peak_mem_ratio={statistics.median(mem):.2f}")
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
