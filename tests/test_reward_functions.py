"""Rewards written as Python functions (reward source kind = 'python', rlhfkit/spine/reward_functions.py): the
function's values become the reward exactly (lists, arrays, tensors, booleans), combine with the other sources by
weight, and every way a user's function can go wrong (a typo in the name, an import that fails, a raise, the
wrong length, NaN, None) is an error naming the source and the function. The shipped example
(examples/digits_reward.py) is checked against the task's gold rule; GRPO on it is in tests/test_acceptance.py."""

import hashlib
import importlib.util
import inspect
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.models.runtime import Runtime
from rlhfkit.pipeline.config import load_config
from rlhfkit.spine.reward_functions import PythonScorer, function_hash, load_function, use_reward_functions
from rlhfkit.spine.reward_sources import build_scorer, preflight_sources
from rlhfkit.tasks import get_task

CPU = Runtime(torch.device("cpu"), None)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_reward.py"
PROMPTS = ["4 5 9 1 =", "0 0 0 0 =", "1 2 3 4 ="]
COMPLETIONS = ["2 6 7 8", "1 1", "5 6 7 8"]

FUNCTIONS = '''
import math
import numpy as np
import torch

def lengths(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def as_array(prompts, completions):
    return np.array([len(c.split()) for c in completions])

def as_tensor(prompts, completions):
    return torch.tensor([[1.5], [2.5], [3.5]])

def as_bools(prompts, completions):
    return [c.startswith("1") for c in completions]

def echo_kwargs(**kwargs):
    return [len(kwargs["prompts"][i]) + len(kwargs["completions"][i]) for i in range(len(kwargs["prompts"]))]

def raises(prompts, completions):
    raise KeyError("no such rule")

def too_few(prompts, completions):
    return [1.0]

def a_nan(prompts, completions):
    return [0.0, math.nan, 1.0]

def a_none(prompts, completions):
    return [0.0, 1.0, None]

def a_number(prompts, completions):
    return 3.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(FUNCTIONS)
    return path


def scorer(rules: Path, name: str) -> PythonScorer:
    spec = f"{rules}:{name}"
    return PythonScorer(load_function(spec, "reward.sources[0]"), spec, "reward.sources[0]", CPU.device)


@pytest.mark.parametrize("name, want", [
    ("lengths", [7.0, 3.0, 7.0]),
    ("as_array", [4.0, 2.0, 4.0]),
    ("as_tensor", [1.5, 2.5, 3.5]),
    ("as_bools", [0.0, 1.0, 0.0]),  # True / False: a binary reward
    ("echo_kwargs", [16.0, 12.0, 16.0]),  # called by keyword, as TRL calls reward functions
])
def test_the_functions_values_are_the_reward(rules, name, want):
    got = scorer(rules, name)(PROMPTS, COMPLETIONS)
    assert got.dtype == torch.float32 and got.shape == (3,) and got.tolist() == want


@pytest.mark.parametrize("name, match", [
    ("raises", r"reward.sources\[0\] \(kind = 'python', .*rules.py:raises\) raised KeyError: 'no such rule'"),
    ("too_few", "returned 1 values for 3 completions"),
    ("a_nan", r"returned nan for item 1 \(prompt '0 0 0 0 ='\).*finite number"),
    ("a_none", r"returned None for item 2 \(prompt '1 2 3 4 ='\)"),
    ("a_number", "returned a float; return one number per completion"),
])
def test_a_function_that_misbehaves_is_an_error_naming_it(rules, name, match):
    with pytest.raises(RlhfkitError, match=match):
        scorer(rules, name)(PROMPTS, COMPLETIONS)


@pytest.mark.parametrize("spec, match", [
    ("no_colon_here", "give 'module:function'"),
    ("{rules}:", "give 'module:function'"),
    ("{dir}/missing.py:f", "no file"),
    ("rlhfkit_no_such_module:f", "no module 'rlhfkit_no_such_module' can be imported"),
    ("{rules}:missing", "has no 'missing'"),
    ("{rules}:NOT_A_FUNCTION", "is a int, not a function"),
    ("{broken}:f", r"importing .*broken.py failed \(ZeroDivisionError"),
    ("math:tau", "is a float, not a function"),
])
def test_a_function_that_cannot_be_loaded_is_a_config_error_naming_the_source(rules, tmp_path, spec, match):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1 / 0\n")
    spec = spec.format(rules=rules, dir=tmp_path, broken=broken)
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].function"):
        load_function(spec, "reward.sources[0]")
    with pytest.raises(ConfigError, match=match):
        load_function(spec, "reward.sources[0]")


def test_an_importable_module_function_loads_by_name():
    assert load_function("math:hypot", "k") is math.hypot


@pytest.mark.parametrize("source, match", [
    ({"kind": "python"}, r"reward.sources\[0\].function.*kind = 'python' calls a function"),
    ({"kind": "gold", "function": "m:f"}, "only kind = 'python' calls a function"),
    ({"kind": "python", "function": "m:f", "path": "/x"}, "kind = 'python' reads no model directory"),
])
def test_bad_python_sources_name_the_field(source, match):
    with pytest.raises(ConfigError, match=match):
        load_config(reward={"sources": [source]}, ppo={"value_init": "policy"})


def test_python_sources_combine_with_the_others_by_weight(rules):
    digits = get_task("digits")
    cfg = load_config(device="cpu", ppo={"value_init": "policy"}, reward={"sources": [
        {"kind": "python", "function": f"{rules}:lengths", "name": "length", "weight": -0.5},
        {"kind": "gold", "weight": 2.0}]})
    preflight_sources(cfg)
    combined, parts = build_scorer(cfg, digits, Path("unused"), CPU).score_sources(PROMPTS, COMPLETIONS)
    assert list(parts) == ["length", "gold"] and parts["length"].tolist() == [7.0, 3.0, 7.0]
    assert torch.allclose(combined, -0.5 * parts["length"] + 2.0 * parts["gold"])


def test_a_typo_in_the_function_fails_the_preflight(rules):
    cfg = load_config(ppo={"value_init": "policy"}, reward={"sources": [{"kind": "python", "function": f"{rules}:lenghts"}]})
    with pytest.raises(ConfigError, match="has no 'lenghts'"):
        preflight_sources(cfg)


def test_the_functions_code_is_an_input_of_the_stages_that_score(rules):
    from rlhfkit.pipeline.stages import stage_inputs, stage_needs

    cfg = load_config(method="grpo", ppo={"value_init": "policy"},
                      reward={"sources": [{"kind": "python", "function": f"{rules}:lengths"}]})
    assert "reward" not in stage_needs("grpo", cfg) and "feedback" not in stage_needs("grpo", cfg)
    before = {s: stage_inputs(s, cfg) for s in ("grpo", "eval", "sft")}
    rules.write_text(FUNCTIONS + "\n# an edit\n")
    assert stage_inputs("grpo", cfg) != before["grpo"] and stage_inputs("eval", cfg) != before["eval"]
    assert stage_inputs("sft", cfg) == before["sft"]
    assert function_hash("sys:exit", "k") == ""  # a built-in module has no source file to hash
    assert len(function_hash("json:dumps", "k")) == 64


def shortest(prompts, completions, **kwargs):
    return [-float(len(c)) for c in completions]


def longest(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class Scaled:
    def __call__(self, prompts, completions):
        return [2.0] * len(completions)


def test_a_registered_function_is_found_by_name_only_while_registered():
    """"@name" (rlhfkit.grpo / rloo / ppo with reward=f): the callable itself within the block, nothing outside it."""
    with use_reward_functions({"@shortest": shortest}):
        assert load_function("@shortest", "reward.sources[0]") is shortest
        with use_reward_functions({"@longest": longest}):  # an inner block sees the outer one's too
            assert load_function("@shortest", "k") is shortest and load_function("@longest", "k") is longest
        with pytest.raises(ConfigError, match=r"reward.sources\[0\].function = '@longest' names a Python function "
                                              "registered only while"):
            load_function("@longest", "reward.sources[0]")
    with pytest.raises(ConfigError, match="none is registered under that name now"):
        load_function("@shortest", "k")
    with pytest.raises(ValueError):
        with use_reward_functions({"shortest": shortest}):  # not "@" and an identifier
            pass


def test_a_registered_functions_code_is_an_input_of_the_stages_that_score():
    """A registered function's own source (inspect) is what the stage inputs hash: another function under the same
    name makes the method and the evaluation stale; a callable object is hashed by its class's source, a builtin by
    its qualified name; a name registered nowhere hashes to "" (as a file that is not there)."""
    from rlhfkit.pipeline.stages import stage_inputs

    cfg = load_config(method="grpo", reward={"sources": [{"kind": "python", "function": "@f"}]})
    inputs = {}
    for fn in (shortest, longest, Scaled(), len):
        with use_reward_functions({"@f": fn}):
            inputs[fn] = (stage_inputs("grpo", cfg), stage_inputs("eval", cfg), stage_inputs("sft", cfg))
            digest = function_hash("@f", "k")
        source = inspect.getsource(fn if inspect.isfunction(fn) else type(fn)) if fn is not len else "builtins.len"
        assert digest == hashlib.sha256(source.encode()).hexdigest()
    grpo, evaluation, sft = zip(*inputs.values())
    assert len({str(x) for x in grpo}) == len({str(x) for x in evaluation}) == 4  # each function its own inputs
    assert len({str(x) for x in sft}) == 1
    assert function_hash("@f", "k") == ""


def test_the_shipped_example_is_the_tasks_rule():
    """examples/digits_reward.py: 1 exactly when the gold judge says preferred first digit, every later digit valid
    and well formed, on demonstrations (about a third rewarded) and on corrupted completions."""
    spec = importlib.util.spec_from_file_location("digits_reward", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digits, rng = get_task("digits"), random.Random(0)
    demos = digits.demonstrations(600, rng)
    prompts = [p for p, _ in demos] * 2
    # and each with its last digit redrawn (sometimes still valid), or made malformed (never)
    completions = [c for _, c in demos] + [c[:-1] + rng.choice("0123456789x") + rng.choice(["", "", " 3"])
                                           for _, c in demos]
    got = module.rule_reward(prompts, completions)
    want = [float(pref and later == 1.0 and formed) for pref, later, formed in
            (digits.judge(p, c) for p, c in zip(prompts, completions))]
    assert got == want and 0.25 < sum(got[:600]) / 600 < 0.4 and sum(got[600:]) > 0
    arr = np.asarray(got)
    assert set(arr.tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------- the prompts' other fields, as keyword arguments


def _prompt_task(tmp_path, rows, name="prompts.jsonl"):
    """A DataTask over a prompt file of `rows` (on digits, whose prompts the file replaces)."""
    import json

    from rlhfkit.tasks import task_for

    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=[f"data.prompts='{path}'", "data.heldout_fraction=0.5"])
    return task_for(cfg), path


QA = [{"prompt": f"What is {a} x {b}?", "answer": str(a * b), "level": a % 3} for a in range(2, 8) for b in (3, 4)]


def test_a_reward_function_gets_each_prompts_own_fields(tmp_path):
    """TRL's dataset columns: a prompt file's other fields reach the function by keyword, one list aligned with the
    completions (the prompts in any order, one prompt repeated, a prompt without the field gets None), so a verifier
    can check each completion against its own reference."""
    rows = QA + [{"prompt": "Say hi."}]
    task, _ = _prompt_task(tmp_path, rows)
    seen = {}

    def exact(prompts, completions, answer, **kwargs):  # TRL's signature, plus the field it reads
        seen.update(answer=answer, **kwargs)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    scorer = PythonScorer(exact, "@exact", "reward.sources[0]", torch.device("cpu"), fields=task.prompt_fields)
    order = [QA[5], QA[0], QA[5], {"prompt": "Say hi."}]
    prompts = [r["prompt"] for r in order]
    completions = [QA[5]["answer"], "41", " " + QA[5]["answer"] + " ", "hi"]
    assert scorer(prompts, completions).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert seen["answer"] == [QA[5]["answer"], QA[0]["answer"], QA[5]["answer"], None]
    assert seen["level"] == [QA[5]["level"], QA[0]["level"], QA[5]["level"], None]  # any JSON value, as read

    def named_only(prompts, completions, answer):  # no **kwargs: the fields it names, nothing else
        return [float(a is not None) for a in answer]

    narrow = PythonScorer(named_only, "@named_only", "reward.sources[0]", torch.device("cpu"), fields=task.prompt_fields)
    assert narrow(prompts, completions).tolist() == [1.0, 1.0, 1.0, 0.0]
    # a task that generates its prompts has no fields: the call is the plain one
    plain = PythonScorer(named_only, "@named_only", "reward.sources[0]", torch.device("cpu"),
                         fields=get_task("digits").prompt_fields)
    with pytest.raises(RlhfkitError, match=r"raised TypeError.*called with prompts=, completions= lists of 4"):
        plain(prompts, completions)


def test_prompt_fields_survive_a_conversion_and_bad_fields_are_named(tmp_path):
    from rlhfkit.core.errors import DataError
    from rlhfkit.data.load import load_prompts
    from rlhfkit.data.contract import write_jsonl

    _, path = _prompt_task(tmp_path, QA)
    records = load_prompts(path)
    assert records[0].fields == {"answer": "6", "level": 2}
    write_jsonl(tmp_path / "again.jsonl", records)  # written back at the top level, as they were read
    assert [r.fields for r in load_prompts(tmp_path / "again.jsonl")] == [r.fields for r in records]
    from rlhfkit.cli import main as cli_main  # `rlhfkit data convert` keeps them too

    assert cli_main(["data", "convert", str(path), str(tmp_path / "converted.jsonl")]) == 0
    assert [r.fields for r in load_prompts(tmp_path / "converted.jsonl")] == [r.fields for r in records]

    clash = [dict(QA[0], answer="7")] + QA  # the same prompt, another answer: which one would the function get?
    with pytest.raises(DataError, match=r"'What is 2 x 3\?' appears with different fields"):
        _prompt_task(tmp_path, clash, "clash.jsonl")
    task, _ = _prompt_task(tmp_path, [dict(r, completions=1) for r in QA], "reserved.jsonl")
    scorer = PythonScorer(lambda prompts, completions, **kw: [0.0] * len(prompts), "@f", "reward.sources[0]",
                          torch.device("cpu"), fields=task.prompt_fields)
    with pytest.raises(RlhfkitError, match=r"field 'completions' has the name of an argument.*rename the field"):
        scorer([QA[0]["prompt"]], ["6"])
