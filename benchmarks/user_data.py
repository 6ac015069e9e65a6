"""Your model, your data, end to end: a local Llama-style model with a chat template, SFT conversations, a
prompt file and a preference file (TRL conversational, Anthropic HH or UltraFeedback), one TOML file each,
`task = "none"`. Prints wall times and what each run reached.

    .venv/bin/python benchmarks/user_data.py [--out runs/user-data] [--threads 1]

The data is the digits language dressed as chat (the user sends digits, the assistant continues them) so
that the outcome is checkable: the preference files prefer the replies the digits gold scorer ranks higher.
The model directory is built here: a byte-level BPE tokenizer trained with `tokenizers` on the data, a
ChatML chat template, no pad token, and a randomly initialised Llama, saved with save_pretrained.
tests/test_user_data.py runs the same files on a tiny budget.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PREFERENCE_FILES = ("trl.jsonl", "hh.jsonl", "ultrafeedback.jsonl")


def build_chat_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer, Llama/Qwen style: BOS added by its post-processor, a ChatML template that
    writes BOS too (tokenising the rendered text with special tokens would double it), <|im_end|> as end of
    turn, and no pad token (as many causal LMs ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    t.chat_template = CHATML
    return t


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_user_files(d: Path, n_demos: int = 600, n_pairs: int = 300, n_prompts: int = 200, n_embd: int = 32,
                    seed: int = 0) -> Path:
    """The model directory and the data files in `d`; returns the model directory."""
    from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
    from rlhfkit.tasks import get_task

    digits = get_task("digits")
    rng = random.Random(seed)
    user = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    demos = digits.demonstrations(n_demos, rng)
    pairs = []
    for p, a in digits.demonstrations(n_pairs, rng):
        b = digits.demonstrations(1, rng)[0][1]
        ga, gb = digits.gold_score(p, a), digits.gold_score(p, b)
        if ga != gb:
            pairs.append((p, a, b) if ga > gb else (p, b, a))
    tokenizer = build_chat_tokenizer([f"user assistant {p} {c}" for p, c in demos[:2000]] + ["Human: Assistant:"] * 20)
    model_dir = d / "my-llama"
    build_tiny_policy(TinyModelSpec("llama", 2, n_embd, 4, 96), tokenizer, seed=seed).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _jsonl(d / "sft.jsonl", [{"messages": user(p) + [{"role": "assistant", "content": c}]} for p, c in demos])
    _jsonl(d / "prompts.jsonl", [{"prompt": user(p)} for p in digits.prompts(n_prompts, rng)])
    # the same as plain text (a prompt/completion file and a .txt prompt file), for a run that keeps the
    # digits task's gold scorer: simulated labelers, gold metrics
    _jsonl(d / "sft_text.jsonl", [{"prompt": p, "completion": c} for p, c in demos])
    (d / "prompts.txt").write_text("".join(p + "\n" for p in digits.prompts(n_prompts, rng)))
    _jsonl(d / "trl.jsonl", [{"prompt": user(p), "chosen": [{"role": "assistant", "content": c}],
                              "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs])
    _jsonl(d / "hh.jsonl", [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
                            for p, c, r in pairs])
    _jsonl(d / "ultrafeedback.jsonl", [{"instruction": p, "completions": [{"response": c, "overall_score": 8.0},
                                                                          {"response": r, "overall_score": 3.0}]}
                                       for p, c, r in pairs])
    return model_dir


def scratch_learning_rates() -> dict:
    """Every learning rate at its field's default, the one for a model trained from scratch: this model is randomly
    initialised, so it needs those, not the ones rlhfkit gives a pretrained policy.path (README, "Bring your own
    model and data": PRETRAINED_LR in each section)."""
    from dataclasses import fields

    from rlhfkit.pipeline.config import Config

    cfg = Config()
    return {f.name: {"lr": getattr(cfg, f.name).lr} for f in fields(cfg)
            if hasattr(getattr(cfg, f.name), "PRETRAINED_LR")}


def write_config(d: Path, model_dir: Path, preferences: str | None, threads: int, budget: dict) -> Path:
    """One TOML file for the whole pipeline on these files. preferences=None: the digits task's simulated
    labelers rank the policy's samples instead (its gold scorer reads the plain-text files)."""
    if preferences is None:
        sections = {"data": {"sft": str(d / "sft_text.jsonl"), "prompts": str(d / "prompts.txt")},
                    "policy": {"path": str(model_dir)}}
    else:
        sections = {
            "data": {"sft": str(d / "sft.jsonl"), "prompts": str(d / "prompts.jsonl"), "max_new_tokens": 8},
            "policy": {"path": str(model_dir)},
            "reward": {"data": str(d / preferences)},
        }
    for name, fields_ in scratch_learning_rates().items():
        sections[name] = {**sections.get(name, {}), **fields_}
    for name, fields in budget.items():
        sections[name] = {**sections.get(name, {}), **fields}
    lines = [f'task = "{"digits" if preferences is None else "none"}"', 'device = "cpu"', f"threads = {threads}", ""]
    for name, fields in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
        lines.append("")
    path = d / f"{Path(preferences).stem if preferences else 'feedback'}.toml"
    path.write_text("\n".join(lines))
    return path


BUDGET = {"sft": {"epochs": 3, "batch_size": 64}, "reward": {"epochs": 4},
          "ppo": {"total_steps": 40, "rollout_batch_size": 64, "minibatch_size": 32},
          "eval": {"n_prompts": 400, "dist_samples": 200}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/user-data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_pipeline

    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    model_dir = make_user_files(d, n_demos=6000, n_pairs=3000, n_prompts=1500, n_embd=64)
    print("| preference file | SFT held-out loss | RM held-out acc. | RM reward SFT -> PPO | PPO KL | wall time |")
    print("|---|---|---|---|---|---|")
    for preferences in PREFERENCE_FILES:
        config = write_config(d, model_dir, preferences, args.threads, BUDGET)
        start = time.time()
        s = run_pipeline(load_config(config), d / f"out-{Path(preferences).stem}")
        ev = s["eval"]
        print(f"| {preferences} | {s['sft']['heldout_loss']:.3f} | {s['reward']['heldout_accuracy']:.3f} | "
              f"{ev['sft']['reward']:.2f} -> {ev['ppo']['reward']:.2f} | {ev['ppo']['kl']:.2f} | "
              f"{time.time() - start:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
