"""Rewards written as Python functions (reward source kind = 'python'; TRL's `reward_funcs`, the basis of RL with
verifiable rewards): a rule, a unit test, a parser, instead of a reward model.

    [[reward.sources]]
    kind = "python"
    function = "examples/digits_reward.py:rule_reward"    # or an importable "package.module:function"

The function is called once per batch, by keyword, as TRL calls its reward functions:

    def rule_reward(prompts: list, completions: list, **kwargs) -> list[float]: ...

prompts and completions as the rest of rlhfkit sees them (text, or a list of chat messages for a chat prompt);
and, by keyword too, every other field of the prompts' records in the prompt file (data.prompts), one list per
field aligned with the completions (None where a prompt lacks the field): a record {"prompt": ..., "answer": "42"}
gives answer=["42", ...], as TRL passes a dataset's other columns. A function without **kwargs gets only the fields
its signature names. One finite number per completion back (a list, tuple, NumPy array or tensor; True / False
count as 1 / 0, a binary reward). A function that raises, returns
another length, or a value that is not a finite number stops the run with an error naming the source, the function
and the first offending item, never a traceback from deep inside the trainer.

A function held in memory (rlhfkit.grpo(..., reward=my_function), rlhfkit/pipeline/api.py) need not be importable:
the call registers it under a name for its duration (use_reward_functions) and the config names it as it names any
other function, `function = "@my_function"`, so the config stays plain data and the scorer is built the same way.
Outside such a call, "@..." names nothing and loading it is a ConfigError.

Layer: spine (imports core). The function's module is imported when a scorer is built (and once by the preflight, so
a typo fails before SFT); its source file's hash (a registered function's own source) is an input of the stages that
score (rlhfkit/pipeline/stages.py), so editing the function makes their outputs stale.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError

SHOWN = 80  # characters of a prompt quoted in an error
REGISTERED = "@"  # a function registered in this process by use_reward_functions: "@name" (no module, no file)

_REGISTRY: dict[str, Callable] = {}


def is_registered_name(spec: str) -> bool:
    """Whether `spec` is of the form a registered function is named by: "@" and an identifier."""
    return spec.startswith(REGISTERED) and spec[len(REGISTERED):].isidentifier()


@contextlib.contextmanager
def use_reward_functions(functions: dict[str, Callable]):
    """Within the block, `function = "@name"` (a key of `functions`) calls functions["@name"]: the Python API's
    callables (rlhfkit.grpo / rloo / ppo with reward=f), which need not be importable. Process-local; an inner
    block sees the outer block's names too."""
    global _REGISTRY
    for name, fn in functions.items():
        if not is_registered_name(name) or not callable(fn):
            raise ValueError(f"register a callable under '@' and an identifier, not {name!r}: {type(fn).__name__}")
    saved, _REGISTRY = _REGISTRY, {**_REGISTRY, **functions}
    try:
        yield
    finally:
        _REGISTRY = saved


def split_spec(spec: str, key: str) -> tuple[str, str]:
    """('module or file', 'function') of "module:function" or "path/to/file.py:function"."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"{key}.function = {spec!r}: give 'module:function' (an importable module) or "
                          "'path/to/file.py:function'")
    return where, name


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def function_source(spec: str, key: str) -> Path | None:
    """The source file that defines the function's module, found without running it (None: not found, or a module
    without a file, or a registered "@name")."""
    if is_registered_name(spec):
        return None
    where, _ = split_spec(spec, key)
    if _is_file(where):
        return Path(where) if Path(where).is_file() else None
    try:
        found = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin and Path(found.origin).is_file() else None


def function_hash(spec: str, key: str) -> str:
    """sha256 of the function's source file ("" when there is none to read): what makes a stage stale. A registered
    function ("@name"): of its own source code where inspect finds it, else of its qualified name ("" when none is
    registered under the name now)."""
    if is_registered_name(spec):
        fn = _REGISTRY.get(spec)
        if fn is None:
            return ""
        while isinstance(fn, functools.partial):
            fn = fn.func
        target = fn if inspect.isroutine(fn) or inspect.isclass(fn) else type(fn)  # a callable object: its class
        try:
            text = inspect.getsource(target)
        except (OSError, TypeError):  # typed into a REPL, a builtin: no source to read
            text = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
        return hashlib.sha256(text.encode()).hexdigest()
    source = function_source(spec, key)
    return hashlib.sha256(source.read_bytes()).hexdigest() if source is not None else ""


def load_function(spec: str, key: str) -> Callable:
    """The callable `spec` names (a registered one for "@name"); a ConfigError names `key` and says what is wrong
    (no such file or module, an import that fails, no such attribute, not callable, nothing registered)."""
    if is_registered_name(spec):
        if spec not in _REGISTRY:
            raise ConfigError(f"{key}.function = {spec!r} names a Python function registered only while the call "
                              "given it runs (rlhfkit.grpo / rloo / ppo, reward=f), and none is registered under that "
                              "name now; give 'module:function' or 'path/to/file.py:function'")
        return _REGISTRY[spec]
    where, name = split_spec(spec, key)
    if _is_file(where):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"{key}.function = {spec!r}: no file {path} (a path is read from the directory the "
                              "run starts in)")
        module_name = f"rlhfkit_reward_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        found = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(found)
        try:
            found.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{key}.function = {spec!r}: importing {path} failed ({type(e).__name__}: {e})") from None
        sys.modules.setdefault(module_name, module)  # so the function's own pickling and imports find it
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{key}.function = {spec!r}: no module {e.name!r} can be imported; check the name, "
                              "install it, or give a file path ('path/to/file.py:function')") from None
        except Exception as e:
            raise ConfigError(f"{key}.function = {spec!r}: importing {where} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{key}.function = {spec!r}: {where} has no {name!r}")
    if not callable(fn):
        raise ConfigError(f"{key}.function = {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _shown(prompt) -> str:
    text = str(prompt).replace("\n", " ")
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


# Keyword arguments every reward function gets: a prompt field of the same name cannot be passed as well
CALL_ARGUMENTS = ("prompts", "completions")


def accepted_fields(fn: Callable) -> Callable[[str], bool]:
    """Which extra keyword arguments `fn` takes: all with **kwargs, else the parameters it names."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it what TRL would, everything
        return lambda name: True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return lambda name: True
    named = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
    return lambda name: name in named


class PythonScorer:
    """A Python function as a reward (kind = 'python'): fn(prompts=..., completions=..., **fields) -> one finite
    number per completion, as a (B,) float32 tensor. `fields(prompt)`: that prompt's other fields
    (Task.prompt_fields), passed one list per field; `key` ('reward.sources[i]') and `spec` name it in errors."""

    def __init__(self, fn: Callable, spec: str, key: str, device: torch.device,
                 fields: Callable[[object], dict] | None = None):
        self.fn, self.spec, self.key, self.device = fn, spec, key, device
        self.fields, self.accepts = fields, accepted_fields(fn)

    def keyword_fields(self, prompts: list) -> dict[str, list]:
        """The prompts' other fields as keyword arguments: name -> one value per row (None where a row lacks it),
        in the order the fields first appear; those fn cannot take are left out."""
        if self.fields is None:
            return {}
        rows = [self.fields(p) for p in prompts]
        names = [n for n in dict.fromkeys(n for row in rows for n in row) if self.accepts(n)]
        clash = [n for n in names if n in CALL_ARGUMENTS]
        if clash:
            raise RlhfkitError(f"{self.key} (kind = 'python', {self.spec}): the prompt file's field {clash[0]!r} has "
                               "the name of an argument every reward function gets; rename the field in the prompt "
                               "file (data.prompts)")
        return {n: [row.get(n) for row in rows] for n in names}

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        who = f"{self.key} (kind = 'python', {self.spec})"
        extra = self.keyword_fields(prompts)
        try:
            raw = self.fn(prompts=list(prompts), completions=list(completions), **extra)
        except Exception as e:
            raise RlhfkitError(f"{who} raised {type(e).__name__}: {e}; fix the function (it is called with "
                               f"{', '.join(f'{n}=' for n in (*CALL_ARGUMENTS, *extra))} lists of {len(prompts)})") from e
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().reshape(-1).tolist()
        try:
            values = list(raw)
        except TypeError:
            raise RlhfkitError(f"{who} returned a {type(raw).__name__}; return one number per completion (a list, "
                               "tuple, array or tensor)") from None
        if len(values) != len(completions):
            raise RlhfkitError(f"{who} returned {len(values)} values for {len(completions)} completions; return one "
                               "per completion, in order")
        scores = []
        for i, v in enumerate(values):
            number = v.item() if hasattr(v, "item") else v
            if not isinstance(number, (int, float)) or not math.isfinite(number):  # True / False: 1 / 0
                raise RlhfkitError(f"{who} returned {v!r} for item {i} (prompt {_shown(prompts[i])!r}); every value "
                                   "must be a finite number (score a completion you cannot judge, e.g. 0.0)")
            scores.append(float(number))
        return torch.tensor(scores, dtype=torch.float32, device=self.device)
