"""The pipeline: stages, their output directories, what is up to date, and resuming PPO.

    OUT/config.toml          the config that produced the outputs below (written when a stage completes)
    OUT/sft/                 model/ (policy, save_pretrained), metrics.jsonl
    OUT/feedback/            comparisons.jsonl, rankings.jsonl (the data contract), stats.json
    OUT/labeling/            the labeling app's project when feedback.labeler = "human" (kept across reruns)
    OUT/reward/              model/ (reward model), metrics.jsonl
    OUT/toxicity/            model/ (toxicity classifier), metrics.jsonl (toxicity.enabled)
    OUT/ppo/ or OUT/dpo/     the policy-optimisation method's stage (`method`): model/, metrics.jsonl, ...
    OUT/eval/                eval.json, report.md + plots
    OUT/summary.json         every figure of the report and each stage's wall time
    OUT/.partial/STAGE/      a stage while it runs (an interrupted PPO resumes from its checkpoint here)
    OUT/.lock                held while a process works in OUT: a second run on the same OUT is refused

Each stage records INPUTS.json (the part of the config its outputs depend on: its own section and those
of the stages it reads) and COMPLETE.json (its result) last. A stage is up to date when COMPLETE.json is
there and INPUTS.json matches the config; `rlhfkit run` skips those. A stage runs in OUT/.partial/STAGE
and replaces OUT/STAGE only once complete, so a failed or killed stage leaves the previous complete
outputs as they were; the stages after it are removed then (their inputs changed). Everything a stage
needs that can be checked without running (device, model directories, data files) is checked before
anything is written. Every stage is also a plain function call: `run_stage("ppo", cfg, out)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import random
import shutil
import time
from pathlib import Path

from rlhfkit.algorithms import METHODS
from rlhfkit.algorithms.classifier import base_model_dir, train_toxicity_classifier
from rlhfkit.algorithms.reward import train_reward_model
from rlhfkit.algorithms.sft import train_sft
from rlhfkit.core import dist
from rlhfkit.core.config import Source, apply_dict, config_to_dict, config_to_toml
from rlhfkit.core.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.core.runio import finite_or_none, is_complete, mark_complete, read_json, stage_result, write_json
from rlhfkit.core.tracking import check_trackers, configure_tracking
from rlhfkit.data.batching import encode_example, encode_prompts
from rlhfkit.data.chat import has_chat_template
from rlhfkit.data.contract import read_comparisons
from rlhfkit.data.labelled import TOXICITY_LABELS, read_labelled_texts
from rlhfkit.data.preferences import load_comparisons, load_rankings, load_thumbs, preference_files, read_preferences
from rlhfkit.evaluation.evaluate import evaluate_run, policy_of
from rlhfkit.evaluation.report import write_report
from rlhfkit.feedback.ai import judge_agreement, run_ai_feedback
from rlhfkit.feedback.simulated import run_simulated_feedback
from rlhfkit.labelapp.hook import human_feedback
from rlhfkit.models.engine import barrier, join_processes, working_alone
from rlhfkit.models.load import check_model_dir, load_tokenizer, quiet_transformers
from rlhfkit.models.lora import adapter_base, is_adapter_dir
from rlhfkit.models.runtime import cpu_watch, resolve_device, resolve_precision, runtime
from rlhfkit.models.sampling import SamplingParams
from rlhfkit.models.scoring import is_decoder_model
from rlhfkit.pipeline.config import REWARD_SCORING_FIELDS, Config, JudgeConfig, RewardConfig, load_config
from rlhfkit.spine.constitution import DEFAULT_CONSTITUTION, load_constitution
from rlhfkit.spine.judging import judge_cache_path, open_judge, preflight_judge
from rlhfkit.spine.reward_functions import function_hash
from rlhfkit.spine.reward_sources import preflight_sources
from rlhfkit.tasks import get_task, task_for
from rlhfkit.tasks.base import REWARD_EOS
from rlhfkit.tasks.files import check_data_paths

# Every stage a run can have, in order; a run goes through those its method needs (pipeline_stages).
STAGES = ("sft", "feedback", "reward", "toxicity", *METHODS, "eval")
_EVERY_STAGE = ("task", "seed", "precision")  # device and threads change speed (and last bits), not the recipe
_ADDED_SECTIONS = ("lora", "sampling")  # read by stages made before the section existed: made with its defaults
_SCORING_DEFAULTS = {k: v for k, v in config_to_dict(RewardConfig()).items() if k in REWARD_SCORING_FIELDS}


class WaitingForLabels(RlhfkitError):
    """The human feedback stage is waiting for labelers; rerun `rlhfkit run` once they are done."""


def _log(msg: str) -> None:
    if dist.is_main_process():  # under `accelerate launch`, once
        print(f"[rlhfkit] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# What each stage reads, and whether its outputs are up to date


def stage_needs(name: str, cfg: Config) -> tuple[str, ...]:
    """The stages whose outputs `name` reads under this config. reward.data replaces the feedback stage
    (it holds the comparisons); reward.init = a directory replaces SFT as the reward model's start;
    reward.sources that name no reward model of this run replace the reward stage; a 'classifier' source without
    a path reads the toxicity stage's classifier, and the evaluation reads it when toxicity.enabled (toxicity_score)."""
    comparisons = () if cfg.reward.data else ("feedback",)
    reward = (("reward",) if cfg.reward.uses_run_model() else ()) + (
        ("toxicity",) if cfg.reward.uses_run_classifier() else ())
    if name in ("sft", "toxicity"):
        return ()
    if name == "feedback":
        return ("sft",)
    if name == "reward":
        return (("sft",) if cfg.reward.init == "sft" else ()) + comparisons
    if name in METHODS:
        needs = METHODS[name].needs
        thumbs = ("feedback",) if "thumbs" in needs and not _thumbs_data(name, cfg) else ()  # NAME.data replaces it
        return ("sft",) + (comparisons if "feedback" in needs else ()) + thumbs + (reward if "reward" in needs else ())
    if name == "eval":  # the reward model scores the policies when the method made one
        scored = reward if "reward" in METHODS[cfg.method].needs else ()
        toxicity = ("toxicity",) if cfg.toxicity.enabled and "toxicity" not in scored else ()
        return ("sft", cfg.method) + scored + toxicity
    raise RlhfkitError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _thumbs_data(name: str, cfg: Config) -> str:
    """The file a method that reads thumbs ("thumbs" in its needs: KTO) learns from: its section's `data`, else
    reward.data (preference data of your own, its pairs read as thumbs, as DPO reads it); empty = the feedback
    stage's."""
    return getattr(getattr(cfg, name), "data", "") or cfg.reward.data


def _sha256(path: str) -> str | None:
    """The content hash of a data file (so an edited file makes the stages that read it stale)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _upstream(name: str, cfg: Config) -> set[str]:
    """Every stage `name` reads, directly or through other stages."""
    out: set[str] = set()
    for needed in stage_needs(name, cfg):
        out |= {needed} | _upstream(needed, cfg)
    return out


# The stages trained by the epochs loop (rlhfkit/spine/epochs.py): [train]'s checkpoints, held-out evaluation and early
# stopping apply to them.
EPOCH_TRAINERS = frozenset({"sft", "reward", "dpo", "simpo", "orpo", "kto"})
# The stages every process runs under `accelerate launch` (each with its share of every batch); the others run on the
# main process while the rest wait.
DISTRIBUTED_STAGES = EPOCH_TRAINERS | {"ppo", "rloo", "grpo", "rejection_sampling", "rest", "online_dpo", "best_of_n"}


def stage_inputs(name: str, cfg: Config) -> dict:
    """The config a stage's outputs depend on: its own section, those of every stage upstream, and the
    content hash of a data file it reads (so an edited reward.data file makes the reward model stale)."""
    full = config_to_dict(cfg)
    inputs = {key: full[key] for key in _EVERY_STAGE}
    if name != "toxicity":  # the toxicity classifier is an encoder of its own: no policy is read to make it
        inputs["policy"] = full["policy"]
    # the stages LoRA changes (and all they feed): every method that trains a policy (not best-of-N), and SFT with
    # lora.sft
    if (name in METHODS and METHODS[name].trains) or (name == "sft" and cfg.lora.sft):
        inputs["lora"] = full["lora"]
    d = cfg.data  # your files in place of the task's data ([data]), and their contents
    if name == "sft" and d.sft:
        inputs["data_sft"] = {"sft": d.sft, "heldout_fraction": d.heldout_fraction, "sha256": _sha256(d.sft)}
    if name not in ("sft", "reward", "toxicity") and (d.prompts or d.max_new_tokens):  # the stages that sample
        inputs["data_prompts"] = {"prompts": d.prompts, "heldout_fraction": d.heldout_fraction,
                                  "max_new_tokens": d.max_new_tokens, "sha256": _sha256(d.prompts)}
    inputs[name] = full[name] if name in full else {}
    if name == "toxicity" and cfg.toxicity.data:  # an edited file of labelled texts makes the classifier stale
        inputs["toxicity_data_sha256"] = _sha256(cfg.toxicity.data)
    if _samples(name):  # the [sampling] filters and stop strings shape what it samples (and all it feeds)
        inputs["sampling"] = full["sampling"]
    if _judges(name, cfg):  # the AI judge's labels (or verdicts) are its output's; its cache and speed settings not
        inputs["judge"] = {**full["judge"], **_JUDGE_RUNTIME_DEFAULTS}
    if name in METHODS and "thumbs" in METHODS[name].needs and _thumbs_data(name, cfg):  # an edited file: stale
        inputs[f"{name}_data_sha256"] = _sha256(_thumbs_data(name, cfg))
    reads_comparisons = name == "reward" or (name in METHODS and "feedback" in METHODS[name].needs)
    if reads_comparisons:  # reward.data and reward.criterion pick the comparisons (for DPO too)
        # how rewards are scored during RL (reward.sources, reward.combine, ...) is not a reward model's input
        inputs["reward"] = {**full["reward"], **_SCORING_DEFAULTS}
        if name != "reward":  # reward.mix_data joins the reward model's comparisons only, not DPO's
            inputs["reward"].update(mix_data="", mix_criterion="")
        if cfg.reward.data and Path(cfg.reward.data).is_file():
            inputs["reward_data_sha256"] = hashlib.sha256(Path(cfg.reward.data).read_bytes()).hexdigest()
        if name == "reward" and cfg.reward.mix_data and Path(cfg.reward.mix_data).is_file():
            inputs["reward_mix_data_sha256"] = hashlib.sha256(Path(cfg.reward.mix_data).read_bytes()).hexdigest()
    if name in EPOCH_TRAINERS and cfg.train.early_stopping_patience > 0:  # where it stops and which weights it keeps
        inputs["train"] = {k: full["train"][k] for k in ("eval_every", "early_stopping_patience")}
    for upstream in stage_needs(name, cfg):
        inputs.update(stage_inputs(upstream, cfg))
    if _scores(name, cfg):  # it is the input of the stages that score with it
        inputs["reward"] = full["reward"]
        for i, s in enumerate(cfg.reward.sources):  # a reward function's code: an edit makes them stale
            if s.kind == "python":
                inputs[f"reward_function_sha256/{i}"] = function_hash(s.function, f"reward.sources[{i}]")
    return inputs


# [judge] fields that change how fast or where judgements are made, not what they are: not a stage's inputs.
JUDGE_RUNTIME_FIELDS = ("batch_size", "max_concurrency", "timeout_s", "max_retries", "cache", "api_key_env")
_JUDGE_RUNTIME_DEFAULTS = {k: v for k, v in config_to_dict(JudgeConfig()).items() if k in JUDGE_RUNTIME_FIELDS}


def _judges(name: str, cfg: Config) -> bool:
    """Whether stage `name` asks the AI judge: the feedback stage with feedback.labeler = 'ai', the evaluation with
    eval.judge."""
    return (name == "feedback" and cfg.feedback.labeler == "ai") or (name == "eval" and cfg.eval.judge)


def _scores(name: str, cfg: Config) -> bool:
    """Whether stage `name` scores responses with the reward (reward.sources or the run's reward model)."""
    method = cfg.method if name == "eval" else name
    return name in (*METHODS, "eval") and "reward" in METHODS[method].needs


def _recorded_inputs(out: Path, name: str, task: str, current: dict) -> dict | None:
    """The inputs a complete stage was made with (INPUTS.json; for directories made before rlhfkit
    recorded them, derived from OUT/config.toml). A field a later rlhfkit added to a section is read as
    its default (the behaviour before it existed), so upgrading rlhfkit does not make every stage stale."""
    path = out / name / "INPUTS.json"
    if path.is_file():
        return _with_new_fields(read_json(path), task, current)
    if (out / "config.toml").is_file():
        return stage_inputs(name, load_config(out / "config.toml"))
    return None


def _with_new_fields(recorded: dict, task: str, current: dict) -> dict:
    """`recorded` with each section's missing fields filled in from the task's defaults, and the sections a
    later rlhfkit reads (e.g. [lora]) at their defaults where the `current` inputs read them (and dropped where
    they no longer do)."""
    base = Config()  # the defaults as such, not a config to run (task = 'none' alone would not validate)
    if task != "none":
        apply_dict(base, get_task(task).default_overrides(), Source("task", task), origins={})
    defaults = config_to_dict(base)
    filled = dict(recorded)
    for section, fields_ in recorded.items():
        if isinstance(fields_, dict) and isinstance(defaults.get(section), dict):
            filled[section] = {**{k: v for k, v in defaults[section].items() if k not in fields_}, **fields_}
    for section in _ADDED_SECTIONS:
        if section in current:
            filled.setdefault(section, defaults[section])
        elif section in filled:  # recorded by an rlhfkit that read it here (best-of-N's [lora]), no longer read
            del filled[section]
    return filled


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif isinstance(a, dict) or isinstance(b, dict):  # a whole section joined or left the inputs
            out.append(f"{prefix}{key}: {'now read' if a is None else 'no longer read'} (method changed?)")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def stage_changes(out: Path, name: str, cfg: Config) -> list[str] | None:
    """None when the stage is not complete; else how its recorded inputs differ from `cfg` ([] = up to date)."""
    if not is_complete(out / name):
        return None
    recorded = _recorded_inputs(out, name, cfg.task, stage_inputs(name, cfg))
    if recorded is None:  # made by hand, or by an rlhfkit that recorded neither INPUTS.json nor config.toml
        return [f"{out / name} records no inputs (INPUTS.json); rerun the stage"]
    return _changes(recorded, stage_inputs(name, cfg))


def _more_ppo_steps(old: dict, new: dict) -> bool:
    """PPO made with inputs `old` can continue, not restart, under `new` when the only change is a larger
    step budget: its learning rate is constant and its checkpoint holds every other piece of state, so
    continuing gives exactly the run a larger budget would have given from the start."""
    strip = lambda d: {**d, "ppo": {k: v for k, v in d.get("ppo", {}).items() if k != "total_steps"}}  # noqa: E731
    return (strip(old) == strip(new)
            and new.get("ppo", {}).get("total_steps", 0) > old.get("ppo", {}).get("total_steps", 0))


# ----------------------------------------------------------------------------------------------------
# Checks before anything is written, and the lock on OUT


def preflight(cfg: Config, out: Path, names: list[str]) -> None:
    """Check what the given stages need that can be checked without running them: device and precision,
    model directories and their tokenizers, data files (readable, one criterion, text the tokenizer can
    represent). Raises RlhfkitError; writes nothing."""
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    check_trackers(cfg.train.tracking)  # a tracker's package missing: said now, not after an hour of SFT
    if cfg.data.sft or cfg.data.prompts:  # read (and check) the files now: errors name the file and line
        check_data_paths(cfg.data)
        task = task_for(cfg)
        for key, n in getattr(task, "truncated", {}).items():
            if n:
                _log(f"data.{key}: {n} prompt(s) longer than data.max_prompt_length = {cfg.data.max_prompt_length} "
                     f"tokens cut on the {cfg.data.truncation_side} (data.truncation_side)")
    if "sft" in names and cfg.policy.path:
        check_model_dir(cfg.policy.path, "policy.path", causal=True)
        load_tokenizer(cfg.policy.path, "policy.path")
    if "toxicity" in names:  # the encoder to fine-tune (the MiniLM package by default) and the labelled texts
        base = base_model_dir(cfg.toxicity.base)
        check_model_dir(base, "toxicity.base", causal=False)
        load_tokenizer(base, "toxicity.base", require_eos=False)
        if cfg.toxicity.data:
            read_labelled_texts(cfg.toxicity.data, TOXICITY_LABELS)
    if cfg.policy.path and not is_complete(out / "sft"):  # a finished SFT stage has already been checked
        check_context_length(cfg, names)
    if any(_judges(name, cfg) for name in names):
        preflight_judge(cfg.judge)
    if "sl_cai" in names:  # the critique -> revision chains are conversations: the policy needs a chat template
        load_constitution(cfg.sl_cai.constitution or DEFAULT_CONSTITUTION)
        if not has_chat_template(_policy_tokenizer(cfg, out)):
            raise ConfigError("method = 'sl_cai' asks the policy to critique and revise its replies in a conversation, "
                              "and its tokenizer has no chat template: set policy.path to a chat model (e.g. "
                              "SmolLM2-135M-Instruct, README 'A real model'), or give its tokenizer a chat_template")
    if "reward" in names and cfg.reward.init != "sft":
        check_model_dir(cfg.reward.init, "reward.init", causal=False)
    if any(_scores(name, cfg) for name in names):  # the reward sources' directories, PPO's value model
        preflight_sources(cfg)
    if "reward" in names and cfg.reward.mix_data:  # the comparisons mixed into the reward model's
        load_comparisons(cfg.reward.mix_data, cfg.reward.mix_criterion, cfg.reward.heldout_fraction, cfg.seed,
                         _reward_tokenizer(cfg, out), stage="reward")
    for stage in names:  # the thumbs file of a method that reads thumbs (kto.data)
        if stage in METHODS and "thumbs" in METHODS[stage].needs and _thumbs_data(stage, cfg):
            section = getattr(cfg, stage)
            load_thumbs(_thumbs_data(stage, cfg), section.criterion, section.heldout_fraction, cfg.seed,
                        _policy_tokenizer(cfg, out), stage=stage)
    if cfg.reward.data:  # the comparisons (rankings) of every stage in `names` that reads them (reward model, DPO)
        for stage in names:
            if stage == "reward" or (stage in METHODS and "feedback" in METHODS[stage].needs):
                fraction = cfg.reward.heldout_fraction if stage == "reward" else getattr(cfg, stage).heldout_fraction
                tokenizer = _reward_tokenizer(cfg, out) if stage == "reward" else _policy_tokenizer(cfg, out)
                # the criterion the stage learns: its own section's (dpo.criterion), else reward.criterion
                criterion = getattr(getattr(cfg, stage), "criterion", "") or cfg.reward.criterion
                if getattr(getattr(cfg, stage), "loss", "") == "plackett_luce":  # whole rankings
                    load_rankings(cfg.reward.data, None, criterion, fraction, cfg.seed, tokenizer, stage=stage)
                else:
                    load_comparisons(cfg.reward.data, criterion, fraction, cfg.seed, tokenizer, stage=stage)


def _samples(name: str) -> bool:
    """Whether stage `name` samples responses from a policy (all but SFT, the reward model and methods that only read
    comparisons, such as DPO)."""
    return name in ("feedback", "eval") or (name in METHODS and "reward" in METHODS[name].needs)


def check_context_length(cfg: Config, names: list[str]) -> None:
    """With a model of your own (policy.path), the longest prompt plus the response budget must fit the model's
    positions wherever a stage samples, and the longest demonstration wherever SFT trains: said before anything
    runs, not when sampling starts after SFT and the reward model have run. (A tiny model built from the config is
    checked by Config.validate: policy.n_ctx.)"""
    from transformers import AutoConfig

    if not (any(_samples(n) for n in names) or ("sft" in names and cfg.data.sft)):
        return  # nothing here samples or trains on demonstrations
    path = Path(cfg.policy.path)
    if is_adapter_dir(path) and not (path / "config.json").is_file():  # a LoRA adapter: its base's positions
        path = adapter_base(path)
    limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if limit is None:
        return
    tokenizer = load_tokenizer(cfg.policy.path, "policy.path")
    task = task_for(cfg)
    budget = task.max_new_tokens
    if any(_samples(n) for n in names):
        prompts = task.all_prompts() if hasattr(task, "all_prompts") else task.prompts(256, random.Random(0))
        lengths = encode_prompts(tokenizer, prompts)[1].sum(dim=1)
        longest = int(lengths.max())
        if longest + budget + REWARD_EOS > limit:  # a reply cut at the budget, then the EOS the reward model reads
            i = int(lengths.argmax())
            where = f"data.prompts = {cfg.data.prompts!r}" if cfg.data.prompts else f"task {cfg.task!r}"
            budget_key = "data.max_new_tokens" + ("" if cfg.data.max_new_tokens else f" (0: the task's {budget})")
            raise ConfigError(
                f"policy.path = {cfg.policy.path!r} has {limit} positions, but the longest prompt of {where} takes "
                f"{longest} tokens (prompt {i + 1}: {str(prompts[i])[:60]!r}) and {budget_key} = {budget} more, and "
                f"the reward model reads an EOS after a reply cut there: {longest} + {budget} + {REWARD_EOS} > {limit}. "
                f"Set data.max_new_tokens to at most {limit - longest - REWARD_EOS}, cut long prompts with "
                f"data.max_prompt_length (at most {limit - budget - REWARD_EOS}) and data.truncation_side, or use a "
                "model with a longer context")
    if "sft" in names and cfg.data.sft:
        demos = [d for split in task.sft_split(0, random.Random(0)) for d in split]
        lengths = [len(encode_example(tokenizer, p, c)[0]) for p, c in demos]
        i = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[i] > limit:
            raise ConfigError(f"policy.path = {cfg.policy.path!r} has {limit} positions, but the longest demonstration "
                              f"of data.sft = {cfg.data.sft!r} takes {lengths[i]} tokens (prompt "
                              f"{str(demos[i][0])[:60]!r}); shorten or drop it, or use a model with a longer context")


def _reward_tokenizer(cfg: Config, out: Path):
    """The tokenizer the reward model will read text with, even before SFT has run."""
    if cfg.reward.init != "sft":
        return load_tokenizer(cfg.reward.init, "reward.init", require_eos=is_decoder_model(cfg.reward.init))
    return _policy_tokenizer(cfg, out)


def _policy_tokenizer(cfg: Config, out: Path):
    """The SFT policy's tokenizer, even before SFT has run."""
    if is_complete(out / "sft"):
        return load_tokenizer(out / "sft" / "model", "sft policy")
    if cfg.policy.path:
        return load_tokenizer(cfg.policy.path, "policy.path")
    return get_task(cfg.task).build_tokenizer()  # task = 'none' requires policy.path (Config.validate)


@contextlib.contextmanager
def locked(out: Path):
    """Hold OUT/.lock for the duration; a second process on the same OUT gets a clear error at once
    (the lock dies with its process, so a killed run never leaves OUT locked)."""
    import fcntl

    if not dist.is_main_process():  # the other processes of one `accelerate launch` run: the main one holds it
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RlhfkitError(f"{out} is in use by {holder}; wait for it to finish or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"rlhfkit process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------
# Running one stage


def _require(out: Path, stage: str, needed: str, cfg: Config) -> Path:
    """OUT/needed, which must be complete and made with the same inputs as `cfg` asks for."""
    changes = stage_changes(out, needed, cfg)
    if changes is None:
        raise RlhfkitError(f"stage '{stage}' needs the '{needed}' stage in {out}; run `rlhfkit {needed} --out {out}` first")
    if changes:
        raise RlhfkitError(
            f"stage '{stage}' needs '{needed}' made with this config, but {out / needed} was made with another "
            f"({'; '.join(changes)}); rerun `rlhfkit {needed} --out {out}` with these settings first, or drop them")
    return out / needed


def _run(name: str, cfg: Config, out: Path, stage_dir: Path) -> dict:
    quiet_transformers()
    task, rt = task_for(cfg), runtime(cfg)
    if name == "sft":
        return train_sft(cfg, task, stage_dir, rt)
    if name == "feedback":
        sft_model = out / "sft" / "model"
        if cfg.feedback.labeler == "human":
            return _human_feedback(cfg, task, sft_model, out, stage_dir)
        if cfg.feedback.labeler == "ai":
            return run_ai_feedback(cfg, task, sft_model, stage_dir, rt, judge_cache_path(cfg.judge, out))

        return run_simulated_feedback(cfg, task, sft_model, stage_dir, rt)
    if name == "reward":
        comparisons, rankings = preference_files(cfg, out, cfg.reward.loss)
        init = out / "sft" / "model" if cfg.reward.init == "sft" else Path(cfg.reward.init)
        gold = task.criterion_score if cfg.task != "none" and not cfg.reward.data else None  # heldout_gold_accuracy
        return train_reward_model(cfg, comparisons, init, stage_dir, rt, rankings_path=rankings, gold=gold)
    if name == "toxicity":
        return train_toxicity_classifier(cfg, task, stage_dir, rt)
    if name in METHODS:  # the policy-optimisation method: rlhfkit/algorithms/__init__.py says which file runs it
        return importlib.import_module(METHODS[name].module).run(cfg, task, out, stage_dir, rt)
    if name == "eval":
        start = time.time()
        sft_model = out / "sft" / "model"
        policies = {"sft": sft_model, cfg.method: policy_of(METHODS[cfg.method], out / cfg.method)}
        rm = out / "reward" / "model" if "reward" in METHODS[cfg.method].needs else None  # or reward.sources
        toxicity = out / "toxicity" / "model" if cfg.toxicity.enabled else None  # each policy's toxicity_score
        judge = open_judge(cfg.judge, rt, judge_cache_path(cfg.judge, out)) if cfg.eval.judge else None
        result = evaluate_run(cfg, task, sft_model, rm, policies, rt, toxicity_dir=toxicity, judge=judge)
        write_json(stage_dir / "eval.json", result)
        summary = build_summary(cfg, out, eval_result=result)
        report = write_report(stage_dir.parent, summary, result, METHODS[cfg.method],  # writes stage_dir/report.md
                              out / cfg.method / "metrics.jsonl", chains_path=out / cfg.method / "chains.jsonl")
        return {**_eval_figures(result), "report": f"eval/{report.name}", "wall_time_s": time.time() - start}
    raise RlhfkitError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _human_feedback(cfg: Config, task, sft_model: Path, out: Path, stage_dir: Path) -> dict:
    """Labels from people through the labeling app (rlhfkit.labelapp); waits until enough items are done."""
    import random


    fb = cfg.feedback
    # Outside the stage directory: an unfinished stage is wiped on rerun, the labels must never be.
    project = Path(fb.project_dir) if fb.project_dir else out / "labeling"
    exported = human_feedback(
        project, policy_dir=sft_model, prompts=task.prompts(fb.n_prompts, random.Random(f"{cfg.seed}-feedback")),
        k=fb.k, overlap=fb.labelers_per_item, items_required=fb.n_prompts, criteria=fb.criteria, seed=cfg.seed,
        max_new_tokens=task.max_new_tokens, temperature=fb.temperature, device=cfg.device,
        sampling=SamplingParams.of(cfg.sampling),
    )
    if exported is None:
        raise WaitingForLabels(
            f"waiting for human labels in {project}; start the app with `rlhfkit label serve {project}`, "
            "and rerun `rlhfkit run` once the items are labeled"
        )
    for name in ("comparisons.jsonl", "rankings.jsonl"):
        shutil.copyfile(Path(exported) / name, stage_dir / name)

    return {"n_items": fb.n_prompts, "n_comparisons": len(read_comparisons(stage_dir / "comparisons.jsonl")), "labeler": "human"}


def _partial_dir(out: Path, name: str, inputs: dict, *, fresh: bool, continue_ppo: bool, resumable: bool) -> Path:
    """OUT/.partial/name, ready to run in: an interrupted run of a resumable stage (Method.resumable, or one of
    EPOCH_TRAINERS with train.checkpoint_every) with the same inputs is kept (it resumes from its checkpoint), a
    finished PPO run being continued is copied in; anything else starts empty."""
    partial = out / ".partial" / name
    if resumable and not fresh:
        legacy = out / name  # layout before .partial: an unfinished PPO run in place
        if not partial.exists() and legacy.is_dir() and not is_complete(legacy) and (legacy / "checkpoint").is_dir():
            partial.parent.mkdir(parents=True, exist_ok=True)
            legacy.rename(partial)
            write_json(partial / "INPUTS.json", inputs)
        saved = partial / "INPUTS.json"
        if partial.is_dir() and saved.is_file():
            if read_json(saved) == inputs or (name == "ppo" and _more_ppo_steps(read_json(saved), inputs)):
                write_json(saved, inputs)
                _log(f"{name}: resuming the interrupted run in {partial}")
                return partial
            _log(f"{name}: discarding an interrupted run in {partial} made with another config")
        if continue_ppo:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            shutil.copytree(out / "ppo" / "checkpoint", partial / "checkpoint")
            shutil.copyfile(out / "ppo" / "metrics.jsonl", partial / "metrics.jsonl")
            write_json(partial / "INPUTS.json", inputs)
            _log(f"{name}: continuing the finished run in {out / 'ppo'} to ppo.total_steps = {inputs['ppo']['total_steps']}")
            return partial
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_json(partial / "INPUTS.json", inputs)
    return partial


def _install(out: Path, name: str, partial: Path, cfg: Config) -> None:
    """Swap the finished stage into OUT/name, then remove the stages after it (their inputs changed)."""
    final, old = out / name, out / ".partial" / f"{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    for later in STAGES:
        if name in _upstream(later, cfg):
            for d in (out / later, out / ".partial" / later):
                recorded = d / "INPUTS.json"
                if recorded.is_file() and name not in read_json(recorded):
                    continue  # made from other stages (e.g. the evaluation of another method): still valid
                if d.exists():
                    shutil.rmtree(d)
                    _log(f"{later}: removed {d} (made from the previous {name} outputs)")


def _stage(name: str, cfg: Config, out: Path, *, fresh: bool, skip_hint: str) -> dict:
    """One stage, with OUT locked and the preflight done: skip it when up to date, else run it.

    Under `accelerate launch` every process comes here: they decide alike from the same files (a barrier first,
    so none reads what another is writing), the main process prepares and installs the stage directory, and a stage
    in DISTRIBUTED_STAGES runs on every process; any other (the feedback, the evaluation, SL-CAI) runs on the main
    process while the others wait."""
    barrier()
    main = dist.is_main_process()
    inputs = stage_inputs(name, cfg)
    changes = stage_changes(out, name, cfg)
    if changes == [] and not fresh:
        _log(f"{name}: up to date in {out / name}, skipping ({skip_hint})")
        return stage_result(out / name)
    for needed in stage_needs(name, cfg):
        _require(out, name, needed, cfg)
    continue_ppo = (name == "ppo" and not fresh and bool(changes) and (out / "ppo" / "checkpoint" / "state.pt").is_file()
                    and _more_ppo_steps(_recorded_inputs(out, "ppo", cfg.task, inputs), inputs))
    if changes:
        _log(f"{name}: config changed ({'; '.join(changes)}); "
             + ("continuing PPO" if continue_ppo else f"redoing {name}"))
    resumable = (name in METHODS and METHODS[name].resumable) or (name in EPOCH_TRAINERS and cfg.train.checkpoint_every > 0)
    partial = out / ".partial" / name
    if main:
        partial = _partial_dir(out, name, inputs, fresh=fresh, continue_ppo=continue_ppo, resumable=resumable)
        _log(f"{name}: running -> {out / name} (in {partial} until complete)")
    barrier()

    result = None
    if main or name in DISTRIBUTED_STAGES:
        with cpu_watch(cfg, name, lambda msg: _log(f"note: {msg}")), \
                (contextlib.nullcontext() if name in DISTRIBUTED_STAGES else working_alone()):
            result = _run(name, cfg, out, partial)
    barrier()
    if main:
        mark_complete(partial, result)
        _install(out, name, partial, cfg)
        (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")  # now describes every output
        write_json(out / "summary.json", build_summary(cfg, out))
    barrier()
    return result if main else stage_result(out / name)


def run_stage(name: str, cfg: Config, out: str | Path, *, fresh: bool = False) -> dict:
    """Run one stage into OUT/name and return its result. An up-to-date stage is skipped unless `fresh`;
    one made with another config of its own section is redone (PPO continues when only its step budget
    grew); the stages it reads must be up to date for `cfg`, else an error says what to run first."""
    if name not in STAGES:
        raise RlhfkitError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    out = Path(out)
    preflight(cfg, out, [name])
    join_processes(cfg.device)
    configure_tracking(cfg.train.tracking, config=config_to_dict(cfg))  # every stage's MetricsLog fans out to them
    with locked(out):
        return _stage(name, cfg, out, fresh=fresh, skip_hint="pass --fresh to redo it")


def judge_labels(cfg: Config, labels: str | Path, out: str | Path, limit: int = 0) -> dict:
    """`rlhfkit judge --labels FILE`: how well the judge of [judge] agrees with labels people gave (AI-labeler
    alignment, Lee et al. 2023) on the comparisons of FILE (any preference format rlhfkit reads; the first `limit`,
    0 = all), before spending on AI labels. Writes OUT/judge_agreement/ (agreement.json, judged.jsonl) whole or not
    at all; the judgements are cached in judge.cache (default OUT/judge_cache.sqlite), so a rerun is free."""
    if not cfg.judge.configured():
        raise ConfigError("rlhfkit judge asks the AI judge: set judge.path to a local causal-LM directory (or "
                          "judge.base_url and judge.model)")
    if limit < 0:
        raise ConfigError(f"--limit {limit}: give the number of comparisons to judge (0 = all)")
    preflight_judge(cfg.judge)
    comparisons = read_preferences(labels, "pairs", "judge")
    comparisons = comparisons[:limit] if limit else comparisons
    if not comparisons:
        raise DataError(f"{labels}: no comparisons to judge")
    out = Path(out)
    partial, final = out / ".partial" / "judge_agreement", out / "judge_agreement"
    out.mkdir(parents=True, exist_ok=True)
    with locked(out), cpu_watch(cfg, "judge", lambda msg: _log(f"note: {msg}")):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        result = judge_agreement(cfg, comparisons, partial, runtime(cfg), judge_cache_path(cfg.judge, out), str(labels))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # complete or absent: never a half-written agreement
    return result


def _eval_figures(eval_result: dict) -> dict:
    """Each policy's evaluation figures (the sample completions stay in eval.json)."""
    return {n: {k: v for k, v in r.items() if k != "samples"} for n, r in eval_result["policies"].items()}


def build_summary(cfg: Config, out: Path, eval_result: dict | None = None) -> dict:
    """Every stage's figures, keyed by stage (and by policy under 'eval'), plus the config."""
    summary: dict = {"config": config_to_dict(cfg)}
    for stage in STAGES:
        if is_complete(out / stage):
            summary[stage] = {k: v for k, v in stage_result(out / stage).items()}
    if eval_result is not None:
        summary["eval"] = _eval_figures(eval_result)
    summary["wall_time_s"] = {s: summary[s].get("wall_time_s") for s in STAGES if s in summary}
    return summary


def pipeline_stages(cfg: Config) -> list[str]:
    """The stages a run goes through, in order: evaluation and everything it reads for this method (no
    reward model for DPO; no feedback stage when reward.data provides the comparisons)."""
    needed = {"eval"} | _upstream("eval", cfg)
    return [s for s in STAGES if s in needed]


def run_pipeline(cfg: Config, out: str | Path, *, update: bool = False) -> dict:
    """All stages in order, skipping up-to-date ones and resuming PPO. Returns summary.json's content.

    A stage made with another config is redone only with `update` (`rlhfkit run --update`); without it
    the run refuses before touching anything and lists the differences."""
    out = Path(out)
    names = pipeline_stages(cfg)
    stale = {n: c for n in names if (c := stage_changes(out, n, cfg))}
    if stale and not update:
        lines = "; ".join(f"{n}: {', '.join(c)}" for n, c in stale.items())
        raise RlhfkitError(
            f"{out} holds outputs made with another config ({lines}). Rerun with --update to redo "
            f"{', '.join(stale)} and the stages after (PPO continues when only ppo.total_steps grew), "
            f"or use a new --out")
    preflight(cfg, out, names)
    join_processes(cfg.device)
    configure_tracking(cfg.train.tracking, config=config_to_dict(cfg))  # every stage's MetricsLog fans out to them
    start = time.time()
    with locked(out):
        for name in names:
            _stage(name, cfg, out, fresh=False, skip_hint=f"`rlhfkit {name} --out {out} --fresh` redoes it")
    summary = build_summary(cfg, out)
    summary["wall_time_s"]["total_this_invocation"] = time.time() - start
    write_json(out / "summary.json", summary)
    return finite_or_none(summary)  # what summary.json holds (strict JSON: null for NaN and inf)


def format_results_table(summary: dict) -> str:
    """The short table printed at the end of `rlhfkit run`: every figure of each evaluated policy."""
    ev = summary.get("eval", {})
    names = [n for n in ("sft", *METHODS) if n in ev]
    labels = {"reward": "reward (RM)", "kl": "KL to reference", "kl_first_position_share": "KL share at position 1"}
    keys = [k for k, v in ev[names[0]].items() if isinstance(v, (int, float)) and k != "kl_k1"] if names else []
    lines = [f"{'metric':<24}" + "".join(f"{n:>10}" for n in names)]
    cell = lambda v: f"{'–':>10}" if v is None or v != v else f"{v:>10.3f}"  # noqa: E731  (null, NaN: undefined)
    lines += [f"{labels.get(k, k):<24}" + "".join(cell(ev[n].get(k)) for n in names) for k in keys]
    if "heldout_accuracy" in summary.get("reward", {}):
        lines.append(f"{'RM held-out accuracy':<24}{summary['reward']['heldout_accuracy']:>10.3f}")
    if "heldout_accuracy" in summary.get("toxicity", {}):
        lines.append(f"{'toxicity clf. held-out':<24}{summary['toxicity']['heldout_accuracy']:>10.3f}")
    wt = summary.get("wall_time_s", {})
    lines.append("wall time: " + ", ".join(f"{s} {wt[s]:.0f}s" for s in STAGES if wt.get(s) is not None))
    return "\n".join(lines)
