"""Supervised fine-tuning: maximise log-likelihood of demonstration completions (prompt tokens masked).

Ouyang et al. (2022), "Training language models to follow instructions with human feedback", Sec. 3.5.
Deviations: demonstrations come from the task's generator; the loss is reported next to the task's
entropy floor (a model that learned the data distribution exactly cannot go below it).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import MetricsLog
from rlhfkit.data.batching import check_representable, encode_pairs
from rlhfkit.models.engine import save_pretrained
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_policy, load_tokenizer
from rlhfkit.models.lora import wrap_lora
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.epochs import LoopOptions
from rlhfkit.spine.finetune import evaluate_nll, fit_completions

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config


def train_sft(cfg: Config, task, out_dir: Path, rt: Runtime) -> dict:
    start = time.time()
    sc = cfg.sft
    rng = random.Random(cfg.seed)

    # 1. Model and tokenizer: a user's local causal LM, or a tiny one built from the config.
    if cfg.policy.path:
        model = load_policy(cfg.policy.path, rt.device, "policy.path")
        tokenizer = load_tokenizer(cfg.policy.path, "policy.path")
    else:
        tokenizer = task.build_tokenizer()
        p = cfg.policy
        model = build_tiny_policy(TinyModelSpec(p.arch, p.n_layer, p.n_embd, p.n_head, p.n_ctx), tokenizer, cfg.seed).to(rt.device)
    if cfg.lora.sft:  # adapters on the pretrained model in policy.path (Config.validate requires one)
        model = wrap_lora(model, cfg.lora, Path(cfg.policy.path), cfg.seed)

    # 2. Demonstrations, tokenised once: prompt + completion + EOS; loss only on completion tokens.
    demos, heldout = task.sft_split(sc.n_demos, rng)
    check_representable(tokenizer, [(f"demonstration {i} {field}", text) for i, (p, c) in enumerate(demos[:256])
                                    for field, text in (("prompt", p), ("completion", c))],
                        f"task '{task.name}'", "policy")
    train = encode_pairs(tokenizer, [p for p, _ in demos], [c for _, c in demos])  # host memory (Runtime.put)
    test = encode_pairs(tokenizer, [p for p, _ in heldout], [c for _, c in heldout])

    # 3. Train: shuffled minibatches, AdamW with linear decay (fit_completions, shared with the methods that
    # fine-tune on selected samples: rejection sampling, ReST).
    if len(demos) < sc.batch_size:  # Config.validate refuses this too; a stage that trains nothing must never look done
        raise RlhfkitError(f"sft.batch_size = {sc.batch_size} > the {len(demos)} demonstrations (sft.n_demos = "
                           f"{sc.n_demos}): no SFT step would run")
    if sc.epochs:
        fit = fit_completions(model, train, epochs=sc.epochs, batch_size=sc.batch_size, lr=sc.lr,
                              weight_decay=sc.weight_decay, generator=torch.Generator().manual_seed(cfg.seed), rt=rt,
                              log=out_dir / "metrics.jsonl", desc="sft", options=LoopOptions.of(cfg.train),
                              checkpoint=out_dir, heldout=test)
    else:  # 0: policy.path as it is
        MetricsLog(out_dir / "metrics.jsonl").close()
        fit = {"steps": 0}

    # 4. Evaluate on held-out demonstrations and save with save_pretrained. With LoRA the adapter is kept in
    #    adapter/ and merged into model/: the SFT policy is every later stage's start and reference.
    heldout_loss = evaluate_nll(model, test, 256, rt)
    floor = task.sft_loss_floor()
    if cfg.lora.sft:
        save_pretrained(model, tokenizer, out_dir / "adapter")
        model = model.merge_and_unload()
    save_pretrained(model, tokenizer, out_dir / "model")
    return {
        "heldout_loss": heldout_loss,
        "loss_floor": floor if floor is not None else math.nan,
        "excess_loss": heldout_loss - floor if floor is not None else math.nan,
        "steps": fit["steps"],
        "n_demos": len(demos),
        "wall_time_s": time.time() - start,
    }
