"""Built-in tasks: tiny languages with a known truth, each carrying its own default config."""

from __future__ import annotations

from rlhfkit.errors import ConfigError
from rlhfkit.tasks.base import Task


def task_names() -> list[str]:
    return ["digits"]


def get_task(name: str) -> Task:
    if name == "digits":
        from rlhfkit.tasks.digits import DigitsTask

        return DigitsTask()
    import difflib

    hint = difflib.get_close_matches(name, task_names(), n=1)
    raise ConfigError(
        f"task = {name!r} is not a built-in task"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Built-in tasks: {', '.join(task_names())}"
    )
