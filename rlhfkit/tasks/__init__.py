"""Built-in tasks: tiny languages with a known truth, each carrying its own default config (merged under the
user's by rlhfkit/pipeline/config.py), and a task made of your files (files.py).

Layer: tasks | feedback | evaluation (independent siblings). May import: algorithms, spine, models, data, ops,
core.
"""

from __future__ import annotations

from rlhfkit.core.errors import ConfigError
from rlhfkit.models.load import load_tokenizer
from rlhfkit.tasks.base import Task
from rlhfkit.tasks.courtesy import CourtesyTask
from rlhfkit.tasks.digits import DigitsTask
from rlhfkit.tasks.files import DataTask


def task_names() -> list[str]:
    return ["digits", "courtesy", "none"]


def task_for(cfg) -> Task:
    """The run's task: the built-in `cfg.task`, with the [data] files (prompts, demonstrations) in place of what
    it generates (rlhfkit.tasks.files); `task = "none"` runs on the files alone."""
    data = cfg.data
    if not (data.sft or data.prompts):
        return get_task(cfg.task)

    base = None if cfg.task == "none" else get_task(cfg.task)
    tokenizer = None
    if data.max_prompt_length:  # prompts are cut in the policy's tokens (its template included)
        tokenizer = load_tokenizer(cfg.policy.path, "policy.path") if cfg.policy.path else base.build_tokenizer()
    return DataTask(base, data, cfg.seed, tokenizer)


def get_task(name: str) -> Task:
    if name == "none":
        raise ConfigError("task = 'none' runs on your files: set data.sft and data.prompts (docs/data.md)")
    if name == "digits":
        return DigitsTask()
    if name == "courtesy":
        return CourtesyTask()
    import difflib

    hint = difflib.get_close_matches(name, task_names(), n=1)
    raise ConfigError(
        f"task = {name!r} is not a built-in task"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Built-in tasks: {', '.join(task_names())}"
    )
