"""rlhfkit from Python, the way a TRL user works: a model and tokenizer in memory (or a directory), data as a list of
records, a `datasets.Dataset` or a file, config sections built in code, callbacks, and the trained model returned —
beside the file-based pipeline (`rlhfkit run`), which stays the main path. Each function runs the same trainer as the
pipeline's stage, on the same data contract, with the same checks:

    import rlhfkit
    sft = rlhfkit.sft(model, tokenizer, [{"prompt": "2+2=", "completion": "4"}, ...], sft={"epochs": 1},
                      train={"gradient_accumulation_steps": 4}, callbacks=[MyCallback()])
    rm = rlhfkit.reward_model(sft.model, sft.tokenizer, preferences)        # prompt / chosen / rejected records
    aligned = rlhfkit.dpo(sft.model, sft.tokenizer, preferences, dpo={"beta": 0.1})
    aligned.model, aligned.result["heldout_accuracy"], aligned.out_dir

The online methods (TRL's GRPOTrainer, RLOOTrainer, PPOTrainer, OnlineDPOTrainer, BestOfNSampler) sample from `model`
on prompts and learn from a reward (best-of-N: pick by it); `model` as it is is the reference:

    def is_short(prompts, completions, **kwargs):                         # TRL's reward_funcs signature
        return [float(len(c) < 20) for c in completions]

    tuned = rlhfkit.grpo(sft.model, sft.tokenizer, ["2+2=", ...], reward=is_short, grpo={"total_steps": 50})
    tuned = rlhfkit.rloo(sft.model, sft.tokenizer, prompts, reward=[rm, is_short])     # summed, weight 1 each
    tuned = rlhfkit.ppo(sft.model, sft.tokenizer, prompts, reward=rm.out_dir / "model")
    tuned.model, tuned.result["final_scores"]
    tuned = rlhfkit.grpo(sft.model, sft.tokenizer, prompts, reward={"sources": [rm, is_short], "weights": [1.0, 0.5]})
    tuned = rlhfkit.online_dpo(sft.model, sft.tokenizer, prompts, reward=rm)     # also rejection_sampling, rest
    picked = rlhfkit.best_of_n(sft.model, sft.tokenizer, prompts, reward=rm, best_of_n={"n": 8})  # trains nothing

`prompts`: strings, records with a "prompt" (text or a conversation: a list of {"role", "content"} messages; other
fields go to Python reward functions as keyword arguments, as TRL's columns do, but for "completion" and the other
fields that would make them another format's), bare conversations, a datasets.Dataset of such records, or a file as data.prompts reads it
(docs/data.md). A share, data.heldout_fraction, is held out by prompt and not trained on (the pipeline's evaluation
prompts). `reward`: a reward model directory, the Trained that rlhfkit.reward_model returned, a Python callable
f(prompts=[...], completions=[...]) -> one number per completion, a "module:function" or "path/to/file.py:function"
string, a [[reward.sources]] table as a dict (any kind, e.g. a classifier with its path), or a list of these, summed.
Each becomes one [[reward.sources]] entry (weight 1, named after the function, or reward_model), scored and logged as
in a pipeline run (objective/scores/<name>). Or a dict of the [reward] section's scoring fields (REWARD_KEYS):
{"sources": [...], "weights": [...]} (one weight per source: reward.sources[i].weight), or {"combine": "llama2",
"safety": r1, "helpfulness": r2, "threshold": 0.15} (reward.combine, the sources named 'safety' and 'helpfulness' as
reward.safety_source / helpfulness_source, reward.safety_threshold; "sources" beside them are logged, not combined;
each of the two is read as a probability: a classifier table's with output = 'prob' as it is, any other score, a
function's included, through the sigmoid, so such a function returns a logit).
`reward` is the whole scoring half of [reward]: a call has no separate reward section. A callable need not be
importable: it is registered under "@<its name>" for the call's duration (rlhfkit.spine.reward_functions
.use_reward_functions), and the config names it so; its source code (inspect) is what the stage's inputs hash.
PPO's value model starts from the first reward model (ppo.value_init = 'reward'); with none among the rewards,
from the policy (ppo.value_init = 'policy') unless the ppo section says otherwise (ppo={"value_init": "shared"}: a
value head on the policy itself, no second network). Best-of-N trains nothing: it
measures the stage's best-of-n curve (OUT/best_of_n/metrics.jsonl) and returns `model` as given. Online DPO, rejection
sampling, ReST and best-of-N call no callbacks (their loops are rounds), and refuse them.

Config sections are keyword arguments, each a dict or the section's dataclass (`rlhfkit.pipeline.config.SFTConfig(...)`).
A model of your own brings the defaults policy.path brings (TRL's learning rates for a pretrained model, e.g.
sft.lr = 2e-5), and a dataclass sets only its fields that differ from the class's defaults, so
SFTConfig(lr=<its class default>) leaves the model's learning rate in place: give such a value in a dict. Callbacks are
objects with any of on_step(step, metrics), on_eval(step, metrics), on_save(step, path) (rlhfkit/spine/epochs.py; the
online methods call on_step after each step with its logged metrics, and on_save with OUT/STAGE/checkpoint; under
`accelerate launch` every process calls them, with the same metrics, so a callback that stops the run stops all).

What happens underneath, so that nothing differs from a pipeline run: a model in memory is saved (save_pretrained)
to OUT/input/model, records are written as JSONL to OUT/input/NAME.jsonl (record i is line i + 1 there, which is what
a data error names), the stage's trainer writes OUT/STAGE (metrics.jsonl, model/), and the trained model is loaded
back from OUT/STAGE/model. OUT is `out`, or a new temporary directory (kept: it holds the run's record). The same
call on the same `out` goes on from the stage's last checkpoint.

Layer: pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms.best_of_n import run as run_best_of_n
from rlhfkit.algorithms.dpo import train_dpo
from rlhfkit.algorithms.grpo import train_grpo
from rlhfkit.algorithms.online_dpo import train_online_dpo
from rlhfkit.algorithms.ppo import train_ppo
from rlhfkit.algorithms.rejection_sampling import train_rejection_sampling
from rlhfkit.algorithms.rest import train_rest
from rlhfkit.algorithms.reward import train_reward_model
from rlhfkit.algorithms.rloo import train_rloo
from rlhfkit.algorithms.sft import train_sft
from rlhfkit.core.config import config_to_dict
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.tracking import configure_tracking
from rlhfkit.data.preferences import preference_files
from rlhfkit.models.engine import join_processes
from rlhfkit.models.load import load_policy, load_scalar_model, load_tokenizer, quiet_transformers
from rlhfkit.models.runtime import runtime
from rlhfkit.pipeline.config import REWARD_SOURCE_KINDS, load_config
from rlhfkit.pipeline.stages import preflight
from rlhfkit.spine.epochs import use_callbacks
from rlhfkit.spine.reward_functions import REGISTERED, use_reward_functions
from rlhfkit.tasks import task_for


@dataclass
class Trained:
    """What a training call returns."""

    model: object  # the trained transformers model (a reward model: AutoModelForSequenceClassification, one label)
    tokenizer: object
    result: dict  # the stage's figures, as the pipeline's summary.json has them (held-out loss and accuracy, ...)
    out_dir: Path  # OUT/STAGE: metrics.jsonl, model/


def sft(model, tokenizer, data, *, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """Supervised fine-tuning of `model` on `data`: prompt/completion records or conversations (docs/data.md), loss
    on completion tokens only, a held-out share (data.heldout_fraction) measured at the end."""
    out, model_dir = _prepare(model, tokenizer, out)
    cfg = _config("sft", sections, policy={"path": model_dir}, data={"sft": _data_file(data, out, "sft")})
    result = _run(cfg, out, "sft", callbacks, lambda rt: train_sft(cfg, task_for(cfg), out / "sft", rt))
    return _trained(out / "sft", result, lambda d, rt: load_policy(d, rt.device, "trained SFT policy"), cfg)


def reward_model(model, tokenizer, data, *, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """A reward model from `model` (its backbone with a new scalar head; a causal LM or an encoder) on preference
    `data`: comparisons (prompt / chosen / rejected, HH, UltraFeedback, ...) or rankings with
    reward={"loss": "plackett_luce"}."""
    out, model_dir = _prepare(model, tokenizer, out)
    cfg = _config("reward", sections, policy={"path": model_dir},
                  reward={"data": _data_file(data, out, "preferences"), "init": model_dir})

    def train(rt):
        comparisons, rankings = preference_files(cfg, out, cfg.reward.loss)
        return train_reward_model(cfg, comparisons, Path(model_dir), out / "reward", rt, rankings_path=rankings)

    result = _run(cfg, out, "reward", callbacks, train)
    return _trained(out / "reward", result,
                    lambda d, rt: load_scalar_model(d, rt.device, "trained reward model", trained_head=True), cfg)


def dpo(model, tokenizer, data, *, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """DPO (or a relative by dpo={"loss": ...}: ipo, plackett_luce on rankings, ...) of `model` on preference `data`,
    `model` as it is being the reference (cached log-probs by default, dpo.reference)."""
    out, model_dir = _prepare(model, tokenizer, out)
    cfg = _config("dpo", sections, policy={"path": model_dir}, reward={"data": _data_file(data, out, "preferences")})

    def train(rt):
        comparisons, rankings = preference_files(cfg, out, cfg.dpo.loss)
        return train_dpo(cfg, comparisons, Path(model_dir), out / "dpo", rt, rankings_path=rankings)

    result = _run(cfg, out, "dpo", callbacks, train)
    return _trained(out / "dpo", result, lambda d, rt: load_policy(d, rt.device, "trained DPO policy"), cfg)


def grpo(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """GRPO (TRL's GRPOTrainer) of `model` on `prompts` against `reward`: grpo.k completions per prompt, each one's
    advantage its z-score within its group, the KL to `model` in the loss (rlhfkit/algorithms/grpo.py)."""
    return _online("grpo", train_grpo, model, tokenizer, prompts, reward, out, callbacks, sections)


def rloo(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """RLOO (TRL's RLOOTrainer) of `model` on `prompts` against `reward`: rloo.k completions per prompt, each one's
    baseline the others' mean reward, the KL to `model` in the reward (rlhfkit/algorithms/rloo.py)."""
    return _online("rloo", train_rloo, model, tokenizer, prompts, reward, out, callbacks, sections)


def ppo(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """PPO (TRL's PPOTrainer) of `model` on `prompts` against `reward`, with a value model (GAE) started from the
    first reward model, or from `model` when `reward` holds none (rlhfkit/algorithms/ppo.py)."""
    return _online("ppo", train_ppo, model, tokenizer, prompts, reward, out, callbacks, sections)


def online_dpo(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(),
               **sections) -> Trained:
    """Online DPO (TRL's OnlineDPOTrainer) of `model` on `prompts`: online_dpo.k completions per prompt, the best and
    the worst by `reward` a pair, DPO on the pairs, `model` the reference; online_dpo.iterations times
    (rlhfkit/algorithms/online_dpo.py)."""
    return _online("online_dpo", train_online_dpo, model, tokenizer, prompts, reward, out, callbacks, sections)


def rejection_sampling(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(),
                       **sections) -> Trained:
    """Rejection-sampling fine-tuning (Llama 2's) of `model` on `prompts`: rejection_sampling.k completions per
    prompt, each prompt's best by `reward` kept (at or above rejection_sampling.threshold), SFT on those;
    rejection_sampling.rounds times (rlhfkit/algorithms/rejection_sampling.py)."""
    return _online("rejection_sampling", train_rejection_sampling, model, tokenizer, prompts, reward, out, callbacks,
                   sections)


def rest(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(), **sections) -> Trained:
    """ReST (Gulcehre et al. 2023) of `model` on `prompts`: Grow rest.k completions per prompt, Improve by SFT on
    those `reward` scores at or above rising quantiles (rest.quantiles); rest.iterations times
    (rlhfkit/algorithms/rest.py)."""
    return _online("rest", train_rest, model, tokenizer, prompts, reward, out, callbacks, sections)


def best_of_n(model, tokenizer, prompts, *, reward, out: str | Path | None = None, callbacks=(),
              **sections) -> Trained:
    """Best-of-N (no training): best_of_n.n completions per prompt from `model`, the answer the one `reward` scores
    highest. As the pipeline's stage, it measures the best-of-n curve on best_of_n.n_prompts of `prompts` (drawn
    again once all are used): OUT/best_of_n/metrics.jsonl has one line per n = 1, 2, 4, ..., N, its objective/scores
    the mean score of the best of n (n = 1: of a plain sample); sampler.json says how to sample. The Trained's model
    is `model` as given, loaded back: the sampler's policy (rlhfkit/algorithms/best_of_n.py)."""

    def train(cfg, task, sft_dir, rm_dir, stage_dir, rt):
        # The stage reads the policy at OUT/sft/model; OUT/input/best_of_n/sft/model is a link to it (never OUT/sft,
        # which in a pipeline's OUT is its SFT policy).
        root = stage_dir.parent / "input" / "best_of_n"
        _link(root / "sft" / "model", sft_dir)
        return run_best_of_n(cfg, task, root, stage_dir, rt)

    return _online("best_of_n", train, model, tokenizer, prompts, reward, out, callbacks, sections)


# The methods whose loops call no callback (rounds of sampling and fine-tuning: rlhfkit/spine/self_training.py; the
# best-of-n curve): a callback given to them is refused rather than silently never called.
_NO_CALLBACKS = ("online_dpo", "rejection_sampling", "rest", "best_of_n")


def _online(stage: str, train, model, tokenizer, prompts, reward, out, callbacks, sections: dict) -> Trained:
    """One online method's call: the model, the prompts file, the reward as the [reward] section's scoring fields
    (callables registered while it runs), the method's own trainer."""
    scoring, functions = _reward_section(reward)  # a reward that is none of those: said before anything is written
    if callbacks and stage in _NO_CALLBACKS:
        raise ConfigError(f"callbacks: rlhfkit.{stage} calls none (its loop is "
                          f"{'the best-of-n curve' if stage == 'best_of_n' else 'rounds of sampling and fine-tuning'}"
                          f"); drop them and read OUT/{stage}/metrics.jsonl, one line per "
                          f"{'n' if stage == 'best_of_n' else 'round'}")
    out, model_dir = _prepare(model, tokenizer, out)
    rm_dirs = [Path(s["path"]) for s in scoring["sources"] if s.get("kind", "reward_model") == "reward_model"]
    sections = {**sections, "method": stage}
    if stage == "ppo" and not rm_dirs:  # no reward model for the value model to start from: the policy, by default
        given = _section(sections.get("ppo", {}))
        if isinstance(given, dict):
            sections["ppo"] = {"value_init": "policy", **given}
    cfg = _config(stage, sections, policy={"path": model_dir}, data={"prompts": _prompts_file(prompts, out)},
                  reward=scoring)
    # Every source names its model by path, so the trainer's rm_dir (in the pipeline OUT/reward/model) is not read.
    rm_dir = rm_dirs[0] if rm_dirs else out / "input" / "no-reward-model"
    with use_reward_functions(functions):
        result = _run(cfg, out, stage, callbacks,
                      lambda rt: train(cfg, task_for(cfg), Path(model_dir), rm_dir, out / stage, rt))
    policy = out / stage / "model" if stage != "best_of_n" else Path(model_dir)
    return _trained(out / stage, result, lambda d, rt: load_policy(d, rt.device, f"trained {stage} policy"), cfg,
                    policy)


def _link(link: Path, target) -> None:
    """`link` a symbolic link to the directory `target` (a copy where links cannot be made), replacing an earlier
    one."""
    target = Path(target).resolve()
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)  # an earlier call's copy, under OUT/input
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:  # e.g. Windows without the privilege
        shutil.copytree(target, link)


# ----------------------------------------------------------------------------------------------------
# What every call does around its trainer

def _prepare(model, tokenizer, out) -> tuple[Path, str]:
    """OUT, and the model's directory: `model` itself when it is a path, else where it was saved (OUT/input/model)."""
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="rlhfkit-"))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, (str, Path)):
        return out, str(model)
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model: expected a transformers model (with save_pretrained) or a model directory, got "
                          f"{type(model).__name__}")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError("tokenizer: a model given as an object needs its tokenizer object beside it")
    model_dir = out / "input" / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return out, str(model_dir)


def _data_file(data, out: Path, name: str, arg: str = "data") -> str:
    """A file the trainers read: `data` itself when it is a path, else its records written as JSONL (`arg`: the
    argument's name in errors)."""
    if isinstance(data, (str, Path)):
        return str(data)
    records = _items(data, arg, "a list of records (dicts), a datasets.Dataset or a file path", "no records")
    path = out / "input" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ConfigError(f"{arg}: record {i} is a {type(record).__name__}, not a dict of fields "
                                  "(docs/data.md)")
            try:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            except TypeError as e:
                raise ConfigError(f"{arg}: record {i} cannot be written as JSON ({e})") from None
    return str(path)


def _items(data, arg: str, expected: str, empty: str) -> list:
    """`data` as a list: itself, or a datasets.Dataset's records; a ConfigError naming `arg` for anything else or
    for none."""
    items = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{arg}: expected {expected}, got {type(data).__name__}")
    if not items:
        raise ConfigError(f"{arg}: {empty}")
    return list(items)


# Fields that make a record another format's (rlhfkit.data.formats.detect_format): not written to a prompt file
_FORMAT_FIELDS = frozenset({"completion", "completions", "chosen", "rejected", "messages", "label"})


def _prompts_file(prompts, out: Path) -> str:
    """data.prompts: `prompts` itself when it is a path, else one {"prompt": ...} record a line in
    OUT/input/prompts.jsonl: a string or a bare conversation becomes one; a record is kept with its other fields
    (Python reward functions get them as keyword arguments), except those that would make the reader take the file
    for another format (_FORMAT_FIELDS: TRL's reward functions do not get a "completion" either)."""
    if isinstance(prompts, (str, Path)):
        return str(prompts)
    items = _items(prompts, "prompts", "a list of strings or {'prompt': ...} records, a datasets.Dataset or a file path",
                   "none given; give at least a few (a share, data.heldout_fraction, is held out)")
    records = []
    for i, item in enumerate(items):
        if isinstance(item, (str, list)):  # a text prompt, or a conversation (a list of messages)
            records.append({"prompt": item})
        elif isinstance(item, dict) and "prompt" in item:
            records.append({k: v for k, v in item.items() if k not in _FORMAT_FIELDS})
        elif isinstance(item, dict):
            fields = ", ".join(map(repr, item)) or "none"
            raise ConfigError(f"prompts: record {i} has no 'prompt' (its fields: {fields}); give each record a "
                              "'prompt', text or a list of {'role', 'content'} messages")
        else:
            raise ConfigError(f"prompts: item {i} is a {type(item).__name__}; give text, a conversation (a list of "
                              "messages) or a {'prompt': ...} record")
    return _data_file(records, out, "prompts", "prompts")


# ----------------------------------------------------------------------------------------------------
# `reward`: the [reward] section's scoring fields (rlhfkit/pipeline/config.py, RewardConfig)

# The dict form's keys and the [reward] fields each sets; nothing else of [reward] applies to an online call.
REWARD_KEYS = {
    "sources": "reward.sources: one reward or a list, each one [[reward.sources]] table",
    "weights": "reward.sources[i].weight: one number per source, in order (combine = 'sum'; default 1 each)",
    "combine": "reward.combine: 'sum' (default) or 'llama2'",
    "safety": "combine = 'llama2': one reward, the source named 'safety' (reward.safety_source)",
    "helpfulness": "combine = 'llama2': one reward, the source named 'helpfulness' (reward.helpfulness_source)",
    "threshold": "combine = 'llama2': reward.safety_threshold, in (0, 1) (default 0.15)",
}
COMBINES = ("sum", "llama2")
# Kinds that read a model directory; with no path they would read a model of the pipeline's OUT, which a call lacks.
_MODEL_KINDS = ("reward_model", "sequence_classifier", "classifier", "judge")


def _reward_section(reward) -> tuple[dict, dict]:
    """The [reward] scoring fields `reward` stands for, and the callables among its sources by the name the config
    calls them ("@name", registered while the call runs). One reward or a list: reward.sources, summed with weight 1
    each. A dict: REWARD_KEYS, each set on the field it names."""
    if not isinstance(reward, dict):
        taken: set = set()
        items = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        if not items:
            raise ConfigError("reward: an empty list; give at least one reward")
        many = isinstance(reward, (list, tuple))
        sources, functions = _sources(items, [f"reward[{i}]" if many else "reward" for i in range(len(items))], taken)
        return {"sources": sources}, functions

    if "kind" in reward:
        raise ConfigError("reward: a dict with 'kind' is one [[reward.sources]] table; give it in a list, "
                          "reward=[{...}], or as reward={'sources': [{...}], ...}")
    for key in reward:
        if key not in REWARD_KEYS:
            hint = difflib.get_close_matches(str(key), REWARD_KEYS, n=1, cutoff=0.6)
            raise ConfigError(f"reward[{key!r}]: not a key of the reward dict" +
                              (f"; did you mean {hint[0]!r}?" if hint else "") + " Its keys: " +
                              "; ".join(f"{k!r} ({v})" for k, v in REWARD_KEYS.items()))
    combine = reward.get("combine", "sum")
    if combine not in COMBINES:
        raise ConfigError(f"reward['combine'] = {combine!r}: choose 'sum' (the sources' weighted sum) or 'llama2' "
                          "(Llama 2's rule on a 'safety' and a 'helpfulness' reward)")
    llama2 = combine == "llama2"
    for key in ("safety", "helpfulness", "threshold"):
        if key in reward and not llama2:
            raise ConfigError(f"reward[{key!r}]: read by combine = 'llama2' only; set reward['combine'] = 'llama2', "
                              f"or drop {key!r}")
    if llama2:
        for key in ("safety", "helpfulness"):
            if key not in reward:
                raise ConfigError(f"reward: combine = 'llama2' needs reward[{key!r}], one reward (a reward model "
                                  "directory, a function, ...) read as a probability (its sigmoid)")
            if isinstance(reward[key], (list, tuple)):
                raise ConfigError(f"reward[{key!r}]: one reward, not a list (combine = 'llama2' compares one safety "
                                  "and one helpfulness score)")
        if "weights" in reward:
            raise ConfigError("reward['weights']: combine = 'llama2' takes the safety or the helpfulness score as "
                              "it is and weighs nothing; drop 'weights', or set combine = 'sum'")
        threshold = reward.get("threshold", 0.15)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ConfigError(f"reward['threshold'] = {threshold!r}: a safety probability in (0, 1) (Llama 2's is "
                              "0.15): below it the safety score is the reward")

    given = reward.get("sources", [])
    items = list(given) if isinstance(given, (list, tuple)) else [given]
    if not items and not llama2:
        raise ConfigError("reward['sources']: none given; give at least one reward (several are summed, weighted by "
                          "reward['weights'])")
    taken = {"safety", "helpfulness"} if llama2 else set()
    many = isinstance(given, (list, tuple))
    sources, functions = _sources(items, [f"reward['sources'][{i}]" if many else "reward['sources']"
                                          for i in range(len(items))], taken)
    if "weights" in reward:
        weights = reward["weights"]
        if not isinstance(weights, (list, tuple)) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ConfigError(f"reward['weights'] = {weights!r}: a list of finite numbers, one per source in the order "
                              "of reward['sources']")
        if len(weights) != len(sources):
            raise ConfigError(f"reward['weights']: {len(weights)} weight(s) for {len(sources)} source(s); give one "
                              "weight per source, in the order of reward['sources']")
        for source, w in zip(sources, weights):
            source["weight"] = float(w)
    scoring = {"sources": sources, "combine": combine}
    if llama2:  # the two sources after reward['sources'], so reward.sources[i] is reward['sources'][i] in messages
        for key in ("safety", "helpfulness"):
            (source,), fn = _sources([reward[key]], [f"reward[{key!r}]"], set(), name=key)
            sources.append(source)
            functions.update(fn)
        scoring.update(safety_source="safety", helpfulness_source="helpfulness",
                       safety_threshold=float(reward.get("threshold", 0.15)))
    return scoring, functions


def _sources(items: list, args: list[str], taken: set, name: str = "") -> tuple[list[dict], dict]:
    """One [[reward.sources]] table per item (`args`: how each is named in errors), named uniquely among `taken`
    (after the function, or reward_model; `name` when given), and the callables by their "@name"."""
    sources, functions = [], {}
    for item, arg in zip(items, args):
        registered = None
        if isinstance(item, Trained):
            if item.out_dir.name != "reward":
                raise ConfigError(f"{arg}: this Trained is the policy rlhfkit.{item.out_dir.name} returned, not a "
                                  "reward model; give what rlhfkit.reward_model returned, or its out_dir / 'model'")
            source = {"kind": "reward_model", "path": str(item.out_dir / "model")}
            base = "reward_model"
        elif isinstance(item, Path) or (isinstance(item, str) and Path(item).is_dir()):
            if not Path(item).is_dir():
                raise ConfigError(f"{arg} = {str(item)!r}: no such directory; give a reward model directory (e.g. "
                                  "rlhfkit.reward_model(...).out_dir / 'model')")
            source, base = {"kind": "reward_model", "path": str(item)}, "reward_model"
        elif isinstance(item, str) and re.fullmatch(r".+:[A-Za-z_]\w*", item):  # "module:function", "file.py:function"
            source, base = {"kind": "python", "function": item}, item.rpartition(":")[2]
        elif isinstance(item, dict):  # a [[reward.sources]] table as it is (a classifier, a judge, ...)
            source = dict(item)
            kind = source.get("kind", "reward_model")
            if kind in _MODEL_KINDS and not source.get("path"):
                raise ConfigError(f"{arg}: kind = {kind!r} with no path reads a model the pipeline trains into its "
                                  "OUT, and this call trains none; give the model's directory as 'path'")
            base = source.get("criterion") or (kind if kind in REWARD_SOURCE_KINDS else "source")
        elif callable(item) and not hasattr(item, "save_pretrained"):
            source = registered = {"kind": "python"}
            base = getattr(item, "__name__", type(item).__name__)
        else:
            what = f"a string naming neither a directory nor a function ({item!r})" if isinstance(item, str) \
                else f"a {type(item).__name__}"
            raise ConfigError(f"{arg}: {what}. Give a reward model directory, the Trained rlhfkit.reward_model "
                              "returned, a function f(prompts=[...], completions=[...]) -> one number per completion, "
                              "'module:function' / 'path/to/file.py:function', a [[reward.sources]] table as a dict, "
                              "or a list of these" +
                              ("; save a model object first (save_pretrained, with its tokenizer) and give its "
                               "directory" if hasattr(item, "save_pretrained") else ""))
        source["name"] = name or source.get("name") or _name(base, taken)  # a table's own name is kept as it is
        taken.add(source["name"])
        if source is registered:  # a callable: under "@name" while the call runs
            source["function"] = REGISTERED + source["name"]
            functions[source["function"]] = item
        sources.append(source)
    return sources, functions


def _name(base: str, taken: set) -> str:
    """A reward source's name (the metric objective/scores/<name>, and a callable's registered "@name"): `base` in
    lowercase letters, digits and '_', from a letter, at most 32 characters, unique among `taken` (which it joins)."""
    name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_")
    if not name[:1].isalpha():
        name = f"reward_{name}".rstrip("_")
    name, n = name[:28], 2
    unique = name
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    taken.add(unique)
    return unique


def _section(value):
    """A section given as its dataclass: only the fields that differ from the defaults; a dict, or a top-level value
    (seed, device, threads, precision), as it is (load_config checks names and types)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        defaults = type(value)()
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(defaults, f.name)}
    return value


def _config(stage: str, sections: dict, **fixed):
    """The validated Config of one stage: task 'none' (your model and data), `fixed` (the model and data this call
    was given) under the caller's sections."""
    merged = {name: _section(value) for name, value in sections.items()}
    for name, values in fixed.items():
        given = merged.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{name}: a config section, give it as a dict or its config dataclass, not "
                              f"{type(given).__name__}")
        merged[name] = {**given, **values}
    return load_config(task="none", stage=stage, **merged)


def _run(cfg, out: Path, stage: str, callbacks, train) -> dict:
    quiet_transformers()
    preflight(cfg, out, [stage])
    join_processes(cfg.device)
    configure_tracking(cfg.train.tracking, config=config_to_dict(cfg))
    rt = runtime(cfg)
    (out / stage).mkdir(parents=True, exist_ok=True)
    try:
        with use_callbacks(callbacks):
            return train(rt)
    finally:
        configure_tracking([])


def _trained(stage_dir: Path, result: dict, load, cfg, model_dir: Path | None = None) -> Trained:
    """What a call returns: the model in `model_dir` (the stage's, OUT/STAGE/model, by default) loaded back."""
    rt = runtime(cfg)
    model_dir = model_dir or stage_dir / "model"
    return Trained(load(model_dir, rt), load_tokenizer(model_dir, "trained model"), result, stage_dir)
