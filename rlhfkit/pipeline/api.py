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

Config sections are keyword arguments, each a dict or the section's dataclass (`rlhfkit.pipeline.config.SFTConfig(...)`).
A model of your own brings the defaults policy.path brings (TRL's learning rates for a pretrained model, e.g.
sft.lr = 2e-5), and a dataclass sets only its fields that differ from the class's defaults, so
SFTConfig(lr=<its class default>) leaves the model's learning rate in place: give such a value in a dict. Callbacks are objects with any of on_step(step, metrics), on_eval(step,
metrics), on_save(step, path) (rlhfkit/spine/epochs.py).

What happens underneath, so that nothing differs from a pipeline run: a model in memory is saved (save_pretrained)
to OUT/input/model, records are written as JSONL to OUT/input/NAME.jsonl (record i is line i + 1 there, which is what
a data error names), the stage's trainer writes OUT/STAGE (metrics.jsonl, model/), and the trained model is loaded
back from OUT/STAGE/model. OUT is `out`, or a new temporary directory (kept: it holds the run's record).

Layer: pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms.dpo import train_dpo
from rlhfkit.algorithms.reward import train_reward_model
from rlhfkit.algorithms.sft import train_sft
from rlhfkit.core.config import config_to_dict
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.tracking import configure_tracking
from rlhfkit.data.preferences import preference_files
from rlhfkit.models.engine import join_processes
from rlhfkit.models.load import load_policy, load_scalar_model, load_tokenizer, quiet_transformers
from rlhfkit.models.runtime import runtime
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import preflight
from rlhfkit.spine.epochs import use_callbacks
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


def _data_file(data, out: Path, name: str) -> str:
    """A file the trainers read: `data` itself when it is a path, else its records written as JSONL."""
    if isinstance(data, (str, Path)):
        return str(data)
    records = data.to_list() if hasattr(data, "to_list") else data  # a datasets.Dataset
    if not isinstance(records, (list, tuple)):
        raise ConfigError(f"data: expected a list of records (dicts), a datasets.Dataset or a file path, got "
                          f"{type(data).__name__}")
    if not records:
        raise ConfigError("data: no records")
    path = out / "input" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ConfigError(f"data: record {i} is a {type(record).__name__}, not a dict of fields (docs/data.md)")
            try:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            except TypeError as e:
                raise ConfigError(f"data: record {i} cannot be written as JSON ({e})") from None
    return str(path)


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


def _trained(stage_dir: Path, result: dict, load, cfg) -> Trained:
    rt = runtime(cfg)
    return Trained(load(stage_dir / "model", rt), load_tokenizer(stage_dir / "model", "trained model"), result,
                   stage_dir)
