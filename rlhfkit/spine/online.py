"""The one online loop's scaffolding, shared by PPO, RLOO and GRPO: everything around their update that is the
same in all three. An algorithm file keeps its own loop and numbered phases and calls these at the seams:

    loop = start_online(cfg, task, sft_dir, rm_dir, out_dir, rt, name="rloo", lr=rc.lr, total_steps=rc.total_steps)
    while loop.step < rc.total_steps:
        r = loop.rollouts(rc.prompts_per_step, k=rc.k, temperature=rc.temperature)   # 1-3. sample, score, log-probs
        t = rloo_targets(...)                                                        # the method's own targets
        stats = loop.minibatch_epochs(len(r.texts), rc.epochs, rc.minibatch_size, loss_fn, rc.max_grad_norm)
        loop.advance()
        loop.log_step({...})                                                          # metrics.jsonl, progress bar
        loop.maybe_checkpoint(rc.checkpoint_every)
    return loop.finish(passes=...)                                                    # the policy, its result

What lives here, once: loading the policy, reference and scorer (rlhfkit.spine.rollout.load_online_models, with
any extra trained model the method adds, e.g. PPO's value model), dropout off, one AdamW over every trained
model at a constant learning rate, the random streams (prompts, sampling, minibatch order), resuming from
OUT/STAGE/checkpoint exactly where a killed run stopped, the JSONL log and progress bar, checkpoints, the Python
API's callbacks (on_step(step, metrics) after each logged step, on_save(step, OUT/STAGE/checkpoint) after each
checkpoint; the process default of rlhfkit.spine.epochs.use_callbacks, called on every process as Epochs does), and the
final save. What a method supplies: its targets (rewards, advantages) and its loss.

Layer: spine (imports models, data, ops, core).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import MetricsLog, progress, read_metrics
from rlhfkit.models.engine import Engine, make_engine, save_pretrained, sharded_state_dict
from rlhfkit.models.forward import disable_dropout
from rlhfkit.models.optim import (
    loop_generators,
    loop_state,
    make_optimizer,
    restore_loop_state,
    save_checkpoint,
)
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import SamplingParams
from rlhfkit.spine.epochs import current_callbacks, notify
from rlhfkit.spine.rollout import OnlineModels, Rollouts, collect_rollouts, load_online_models


@dataclass
class OnlineRun:
    """One online method's run in progress: its models, optimiser, random streams, log and step counter."""

    cfg: object
    task: object
    rt: Runtime
    out_dir: Path
    name: str  # the method: its random streams and progress bar are named after it
    total_steps: int
    tokenizer: object
    policy: object  # trained
    reference: object  # rlhfkit.models.reference.Reference: pi_ref, the SFT policy
    scorer: object  # the reward (rlhfkit.spine.reward_sources.build_scorer)
    models: dict  # every trained model by checkpoint name: "policy", and e.g. PPO's "value"
    params: list
    optimizer: object
    scheduler: object
    prompt_rng: object
    sample_gen: torch.Generator
    order_gen: torch.Generator
    resume: bool  # resumed from a checkpoint
    state: dict | None  # that checkpoint's state.pt (a method restores its own extras from it)
    step: int
    start_time: float  # moved back by the time spent before a resume, so wall_time_s is the whole run
    log: MetricsLog
    bar: object = field(repr=False)
    engine: Engine = field(repr=False, default=None)  # the optimiser steps (micro-batches): rlhfkit/models/engine.py
    callbacks: list = field(default_factory=list)  # the Python API's (rlhfkit.spine.epochs.use_callbacks)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def rollouts(self, n_prompts: int, *, temperature: float, k: int = 1, value_model=None,
                 policy_logprobs: bool = True) -> Rollouts:
        """Phases 1-3 of every online method: the next n_prompts training prompts, k responses each sampled from
        the policy (with the [sampling] filters and stop strings) and scored, with the policy's and the reference's
        log-probs (and values, with a critic). policy_logprobs=False: no policy pass here (the method takes the
        log-probs from its training pass; collect_rollouts)."""
        prompts = self.task.prompts(n_prompts, self.prompt_rng)  # the global batch's: the same in every process
        if self.engine.world > 1:  # this process's contiguous share (each prompt's k samples stay together)
            if n_prompts % self.engine.world:
                raise ConfigError(f"{self.name}: {n_prompts} prompts a step do not split evenly over "
                                  f"{self.engine.world} processes; make the prompts per step a multiple of them")
            share = n_prompts // self.engine.world
            prompts = prompts[self.engine.rank * share : (self.engine.rank + 1) * share]
        with self.engine.gathered():  # under train.sharding: each block gathered once, not once a token
            return collect_rollouts(self.policy, self.reference, self.scorer, self.tokenizer, prompts, k=k,
                                    value_model=value_model, policy_logprobs=policy_logprobs,
                                    max_new_tokens=self.task.max_new_tokens,
                                    temperature=temperature, generator=self.sample_gen, rt=self.rt,
                                    sampling=SamplingParams.of(self.cfg.sampling))

    def minibatch_epochs(self, batch: int, epochs: int, minibatch_size: int,
                         loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]], max_grad_norm: float,
                         units: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """`epochs` passes over a batch of `batch` rollouts in shuffled minibatches: loss_fn(idx) -> (loss, stats)
        for the rows idx, one optimiser step each (in train.gradient_accumulation_steps micro-batches, each weighted
        by its `units(rows)`, default rows: PPO's token-mean losses pass the response tokens). Returns each stat's
        mean over the steps."""
        self.engine.max_grad_norm = max_grad_norm
        self.engine.check_batch(minibatch_size, f"{self.name}'s minibatch size")
        world = self.engine.world  # each process holds 1/world of the batch and takes 1/world of each minibatch
        if batch % world or minibatch_size % world:
            raise ConfigError(f"{self.name}: a batch of {batch} rollouts in minibatches of {minibatch_size} does not "
                              f"split evenly over {world} processes; make both multiples of {world}")
        batch, minibatch_size = batch // world, minibatch_size // world
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(epochs):
            order = torch.randperm(batch, generator=self.order_gen).to(self.rt.device)
            for start in range(0, batch, minibatch_size):
                out = self.engine.step(order[start : start + minibatch_size], loss_fn, units, step_scheduler=False,
                                       local=True)
                for key, v in out.items():
                    if key != "loss":  # the method's stats name its loss terms itself
                        stats.setdefault(key, []).append(v)  # no .item() here: no device sync per minibatch
        return {key: torch.stack(v).mean().item() for key, v in stats.items()}

    def advance(self) -> None:
        """One iteration done: the (constant) schedule steps and the step counter moves on."""
        self.scheduler.step()
        self.step += 1

    def log_step(self, record: dict) -> None:
        """Write the iteration's metrics (one JSONL line) and show the score and KL on the progress bar. Under
        several processes each holds part of the batch: every figure becomes the mean over the processes (in place,
        so every process goes on with the same numbers: the KL controller, the reward threshold); a mean over the
        rollouts is then the whole batch's (the parts are equal), a mean over tokens nearly so."""
        if self.engine.world > 1:
            names = [k for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
            sums = self.engine.reduce_sum({k: torch.tensor(float(record[k]), device=self.rt.device) for k in names})
            record.update({k: sums[k].item() / self.engine.world for k in names})
        self.log.log(record)
        if self.engine.is_main:
            self.bar.update(1)
            self.bar.set_postfix(score=f"{record['objective/scores']:.2f}", kl=f"{record['objective/kl']:.3f}",
                                 refresh=False)
        # Every process, as the offline trainers' Epochs does (the record is the same on all: averaged above), so
        # that a callback which stops the run stops all of them.
        notify(self.callbacks, "on_step", self.step, dict(record))  # a copy: PPO reads record after this

    def maybe_checkpoint(self, every: int, force: bool = False, **extra_state) -> None:
        """Save a resumable checkpoint every `every` steps, at the last step, or when forced; `extra_state` holds
        what the method itself must restore (PPO: its KL coefficient and reward moments)."""
        if self.step % every == 0 or self.step == self.total_steps or force:
            state = loop_state(self.step, self.optimizer, self.scheduler, self.prompt_rng, self.sample_gen,
                               self.order_gen, time.time() - self.start_time, **extra_state)
            # under train.sharding every process takes part in gathering the optimiser state and the weights
            state["optimizer"] = self.engine.optimizer_state()
            whole = {name: sharded_state_dict(model) for name, model in self.models.items()}
            if self.engine.world > 1:  # each process samples from its own stream: keep every one
                states: list = [None] * self.engine.world
                torch.distributed.all_gather_object(states, state["rng"])
                state["rng_by_rank"] = states
            if self.engine.is_main:
                save_checkpoint(self.ckpt_dir, self.models, self.tokenizer, state, whole)
            self.engine.barrier()
            notify(self.callbacks, "on_save", self.step, self.ckpt_dir)

    def last_logged(self) -> dict:
        """The last line of the metrics log (after a resume with nothing left to do, the checkpoint's last step)."""
        return read_metrics(self.out_dir / "metrics.jsonl")[-1]

    def finish(self, **extra) -> dict:
        """Save the policy in OUT/STAGE/model and return the stage's result: steps, the last logged score and KL,
        whether it resumed, `extra` (e.g. passes) and the whole run's wall time."""
        if self.engine.is_main:
            self.bar.close()
        self.log.close()
        self.engine.keep_gathered()  # under train.sharding: whole models from here on
        save_pretrained(self.policy, self.tokenizer, self.out_dir / "model")  # by the main process, the others wait
        last = self.last_logged()
        return {"steps": self.step, "final_scores": last["objective/scores"], "final_kl": last["objective/kl_k1"],
                "resumed": self.resume, **extra, "wall_time_s": time.time() - self.start_time}


def start_online(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime, *, name: str, lr: float,
                 total_steps: int, extra_models: Callable[[OnlineModels], dict] | None = None) -> OnlineRun:
    """Load the models (resuming from out_dir/checkpoint when one exists), set up the optimiser and random
    streams, and open the log. `extra_models(m)` returns further trained models by checkpoint name (PPO's value
    model); they are loaded after the policy, reference and scorer, and trained by the same optimiser."""
    start_time = time.time()
    ckpt_dir = out_dir / "checkpoint"

    # The policy (trained; the checkpoint's when resuming), the reference (frozen SFT copy, or the LoRA policy with
    # its adapter off), the scorer (frozen), and whatever the method adds.
    m = load_online_models(cfg, task, sft_dir, rm_dir, ckpt_dir, rt)
    models = {"policy": m.policy, **(extra_models(m) if extra_models is not None else {})}
    for model in models.values():
        # Dropout off: with it, new/old ratios differ from 1 before any update (TRL and OpenRLHF do the same).
        disable_dropout(model)
        model.train()
    params = [p for model in models.values() for p in model.parameters()]
    optimizer, scheduler = make_optimizer(params, lr, total_steps, final_fraction=1.0)  # constant learning rate
    # Several processes (`accelerate launch`): DDP over the trained models; each process samples its share of every
    # batch's prompts from its own stream (rank 0's is one process's), the statistics of the whole batch gathered.
    engine = make_engine(models, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         checkpointing=rt.checkpointing, sharding=rt.sharding)
    optimizer = engine.optimizer
    prompt_rng, sample_gen, order_gen = loop_generators(cfg.seed, name, rt.device)
    if engine.rank > 0:
        sample_gen.manual_seed(cfg.seed + 1_000_003 * engine.rank)
    step, state = 0, None
    if m.resume:
        state = torch.load(ckpt_dir / "state.pt", weights_only=False)
        if "rng_by_rank" in state:
            if len(state["rng_by_rank"]) != engine.world:
                raise ConfigError(f"{ckpt_dir} was written by {len(state['rng_by_rank'])} processes; resume it with "
                                  f"as many (this run has {engine.world}), or start the stage afresh")
            state["rng"] = state["rng_by_rank"][engine.rank]
        step, elapsed = restore_loop_state(state, engine.load_optimizer_state, scheduler, prompt_rng, sample_gen,
                                           order_gen)
        start_time -= elapsed
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=step if m.resume else None)
    bar = progress(total_steps, name) if engine.is_main else None
    if bar is not None:
        bar.update(step)
    return OnlineRun(cfg, task, rt, out_dir, name, total_steps, m.tokenizer, m.policy, m.reference, m.scorer, models,
                     params, optimizer, scheduler, prompt_rng, sample_gen, order_gen, m.resume, state, step,
                     start_time, log, bar, engine, current_callbacks())


def check_group_section(name: str, g, checks) -> None:
    """The rules RLOO's and GRPO's sections share (K samples per prompt, minibatches of the K x prompts batch);
    `checks`: rlhfkit.core.config.Checks."""
    need = checks.need
    checks.at_least_one(*(f"{name}.{key}" for key in ("total_steps", "prompts_per_step", "minibatch_size", "epochs",
                                                       "checkpoint_every")))
    need(g.k >= 2, f"{name}.k", "sample at least 2 completions per prompt: the baseline comes from the others")
    need(g.minibatch_size <= g.prompts_per_step * g.k, f"{name}.minibatch_size",
         f"larger than a batch ({name}.prompts_per_step * {name}.k = {g.prompts_per_step * g.k}), so no "
         f"gradient step would be made; lower {name}.minibatch_size")
    need((g.prompts_per_step * g.k) % g.minibatch_size == 0, f"{name}.minibatch_size",
         f"must divide {name}.prompts_per_step * {name}.k = {g.prompts_per_step * g.k}")
    checks.positive(*(f"{name}.{key}" for key in ("lr", "temperature", "clip_range")))
    need(g.beta >= 0, f"{name}.beta", "must be >= 0 (0 disables the KL penalty)")
    need(g.max_grad_norm >= 0, f"{name}.max_grad_norm", "must be >= 0 (0 disables the clip)")
