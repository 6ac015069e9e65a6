"""Typed config: layering, overrides, and clear errors for bad input."""

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from rlhfkit.core.config import F, apply_dict, config_diff, config_to_toml, parse_override
from rlhfkit.core.errors import ConfigError
from rlhfkit.pipeline.config import Config, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_valid_and_toml_roundtrip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert config_diff(cfg, load_config(path)) == []
    assert load_config(path).ppo.reward_threshold == math.inf


def test_precedence_file_then_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[ppo]\nkl_coef = 0.5\ntotal_steps = 7\n')
    cfg = load_config(path, ["ppo.kl_coef=0", "policy.arch=llama"])
    assert (cfg.seed, cfg.ppo.kl_coef, cfg.ppo.total_steps, cfg.policy.arch) == (3, 0.0, 7, "llama")
    assert isinstance(cfg.ppo.kl_coef, float)
    assert load_config(ppo={"kl_coef": 0.3}).ppo.kl_coef == 0.3


@pytest.mark.parametrize("overrides,needle", [
    (["ppo.kl_coeff=1"], "--set unknown key 'ppo.kl_coeff'; did you mean 'ppo.kl_coef'?"),
    (["polcy.arch=gpt2"], "did you mean 'policy'"),
    (["sed=1"], "did you mean 'seed'"),
    (["sft.lr=fast"], "sft.lr = 'fast': expected float"),
    (["seed=1.5"], "expected int"),
    (["feedback.k=1"], "feedback.k = 1"),
    (["feedback.k=12"], "between 2 and 9"),
    (["ppo.minibatch_size=48"], "must divide ppo.rollout_batch_size"),
    (["policy.n_head=3"], "must divide policy.n_embd"),
    (["ppo.kl_estimator='k4'"], "'k1', 'k2' or 'k3'"),
    (["feedback.error_rate=2"], "probability"),
    (["ppo=1"], "is a section"),
    (["task='digitz'"], "did you mean 'digits'"),
    (["justakey"], "section.key=value"),
])
def test_bad_config_messages(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ppo\nkl_coef = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    unknown = tmp_path / "u.toml"
    unknown.write_text("[ppo]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"u.toml:2: unknown key 'ppo.learning_rate'"):
        load_config(unknown)


def test_parse_override_values():
    assert parse_override("ppo.adaptive_kl=true") == {"ppo": {"adaptive_kl": True}}
    assert parse_override("policy.path=/tmp/my model") == {"policy": {"path": "/tmp/my model"}}
    assert parse_override("ppo.reward_threshold=inf") == {"ppo": {"reward_threshold": math.inf}}


def test_every_field_documented_in_readme():
    """The README's config reference is exactly what the config dataclasses say (every field, its default and
    help): scripts/config-reference.py --write regenerates it (a meta-test, datasette style)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", README.parent / "scripts" / "config-reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    text = README.read_text()
    start, end = ref.readme_table(text)
    assert text[start:end] == ref.reference_table(), "README config reference is stale: run scripts/config-reference.py --write"
    cfg = Config()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", text[start:end], flags=re.M))
    assert {f"{f.name}.{sf.name}" for f in fields(cfg) if hasattr(getattr(cfg, f.name), "__dataclass_fields__")
            for sf in fields(getattr(cfg, f.name))} <= documented


# ----------------------------------------------------------------------------------------------------
# Lists: `feedback.criteria` (list[str]) is the real user; an array of tables is tested on dataclasses
# defined here, the shape a later `[[reward.sources]]` would have.

CRITERIA = '["helpfulness", "harmlessness"]'


def test_list_field_from_toml_set_and_python(tmp_path):
    path = tmp_path / "c.toml"
    # (people label these criteria; the digits task's simulated labelers judge 'overall' only)
    path.write_text(f"[feedback]\nlabeler = 'human'\ncriteria = {CRITERIA}\n[reward]\ncriterion = '*'\n")
    assert load_config(path).feedback.criteria == ["helpfulness", "harmlessness"]
    assert load_config(path, ['feedback.criteria=["overall"]']).feedback.criteria == ["overall"]  # --set wins, whole
    assert load_config(overrides=[f"feedback.criteria={CRITERIA}", "task='courtesy'"]).feedback.criteria == [
        "helpfulness", "harmlessness"]
    given = ["helpfulness"]
    cfg = load_config(feedback={"criteria": given, "labeler": "human"})
    given.append("harmlessness")  # the config holds its own copy
    assert cfg.feedback.criteria == ["helpfulness"]


def test_list_defaults_are_not_shared():
    a, b = Config(), Config()
    a.feedback.criteria.append("harmlessness")
    assert b.feedback.criteria == ["overall"] and Config().feedback.criteria == ["overall"]


def test_config_with_lists_roundtrips_and_diffs(tmp_path):
    cfg = load_config(overrides=[f"feedback.criteria={CRITERIA}", "feedback.labeler='human'",
                                 "reward.criterion='harmlessness'"])
    text = config_to_toml(cfg)
    assert f"criteria = {CRITERIA}  # " in text  # with its help, like every field
    path = tmp_path / "c.toml"
    path.write_text(text)
    back = load_config(path)
    assert back == cfg and config_diff(cfg, back) == []
    assert "feedback.criteria: ['overall'] -> ['helpfulness', 'harmlessness']" in config_diff(load_config(), cfg)


@pytest.mark.parametrize("overrides,needle", [
    (['feedback.criteria=["a", 3]'], "--set feedback.criteria[1] = 3: expected str, got int"),
    (["feedback.criteria=helpfulness"], 'expected a list of str, got str; write a TOML array such as ["helpfulness"]'),
    (["feedback.criteria=[]"], "give at least one criterion"),
    (['feedback.criteria=["a", "a"]'], "lists a criterion twice"),
    (['feedback.criteria=["a", ""]'], "'' is not a criterion name"),
    (['feedback.criteria=["Helpful ness"]'], "'Helpful ness' is not a criterion name"),
    (["feedback.labeler='human'", f"feedback.criteria={CRITERIA}"], "set reward.criterion to one of them"),
    (["feedback.labeler='human'", "reward.criterion='helpfulness'"], "feedback.criteria = ['overall']"),
])
def test_bad_list_messages(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)


@dataclass
class Source:
    """One reward source (the shape of a later [[reward.sources]])."""

    kind: str = F("gold", "Where scores come from.")
    path: str = F("", "Model directory.")
    weight: float = F(1.0, "Weight in the sum.")


@dataclass
class Mix:
    """A section holding every kind of list field."""

    sources: list[Source] = F([], "Reward sources, summed.")
    tags: list[str] = F(["a"], "Names.")
    steps: list[int] = F([1, 2], "Step numbers.")
    scales: list[float] = F([0.5], "Scales.")


@dataclass
class Root:
    seed: int = F(0, "Seed.")
    mix: Mix = field(default_factory=Mix)


TABLES = """
seed = 1
[mix]
tags = ["x", 'say "hi"', "back\\\\slash"]
steps = [3]
scales = [1, 2.5, "inf"]
[[mix.sources]]
kind = "rm"
path = "runs/a/reward/model"
weight = 2
[[mix.sources]]
path = "runs/b/reward/model"
"""


def test_array_of_tables_reads_coerces_and_roundtrips():
    root = apply_dict(Root(), tomllib.loads(TABLES), "f.toml: ")
    assert root.mix.sources == [Source("rm", "runs/a/reward/model", 2.0), Source("gold", "runs/b/reward/model", 1.0)]
    assert isinstance(root.mix.sources[0].weight, float) and root.mix.scales == [1.0, 2.5, math.inf]
    assert root.mix.tags == ["x", 'say "hi"', "back\\slash"] and root.mix.steps == [3]
    assert Root().mix.sources == [] and Root().mix.sources is not Root().mix.sources

    text = config_to_toml(root)
    assert text.count("[[mix.sources]]  # Reward sources, summed.") == 2 and "weight = 2.0  # Weight in the sum." in text
    back = apply_dict(Root(), tomllib.loads(text))
    assert back == root and config_diff(root, back) == []
    back.mix.sources[1].weight = 3.0
    assert config_diff(root, back) == ["mix.sources[1].weight: 1.0 -> 3.0"]
    assert config_diff(Root(), root)[1].startswith("mix.sources: [] -> [{'kind': 'rm'")  # lengths differ: whole
    assert tomllib.loads(config_to_toml(Root()))["mix"]["sources"] == []  # an empty array of tables reads back too


@pytest.mark.parametrize("text,needle", [
    ('[[mix.sources]]\nkindd = "rm"', "f.toml: unknown key 'mix.sources[0].kindd'; did you mean 'mix.sources[0].kind'?"),
    ('[[mix.sources]]\n[[mix.sources]]\nweight = "heavy"', "mix.sources[1].weight = 'heavy': expected float, got str"),
    ('[mix]\nsources = ["rm"]', "mix.sources[0] = 'rm': expected a table of kind, path, weight, got str"),
    ('[mix.sources]\nkind = "rm"', "expected a list of tables, got dict; write one [[mix.sources]] table per element"),
    ("[mix]\nsteps = [1, true]", "mix.steps[1] = True: expected int, got bool"),
    ("[mix]\nscales = [1, 1.5, \"x\"]", "mix.scales[2] = 'x': expected float, got str"),
    ("[mix]\nsteps = 3", "mix.steps = 3: expected a list of int, got int; write a TOML array such as [3]"),
])
def test_array_of_tables_errors_name_the_element(text, needle):
    with pytest.raises(ConfigError) as e:
        apply_dict(Root(), tomllib.loads(text), "f.toml: ")
    assert needle in str(e.value)


def test_table_without_default_must_be_given():
    @dataclass
    class Needs:
        kind: str

    @dataclass
    class Holder:
        items: list[Needs] = F([], "Items.")

    with pytest.raises(ConfigError, match=r"items\[0\]: missing key 'kind'"):
        apply_dict(Holder(), {"items": [{}]})


# ----------------------------------------------------------------------------------------------------
# Where a bad value came from: FILE:LINE for a key read from TOML, --set, the task's defaults.

@pytest.mark.parametrize("data,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    ('seed = 1\n[ppo]\nkl_coef = 0.1\n'.encode("utf-16"), "not UTF-8 text"),  # with a BOM: 0xff 0xfe
    ('seed = 1\n[ppo]\nkl_coef = 0.1\n'.encode("utf-16-le"), "NUL bytes"),  # no BOM: ASCII with NULs between
], ids=["binary", "utf-16", "utf-16-le-without-bom"])
def test_non_utf8_config_file(tmp_path, data, needle):
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}") and needle in str(e.value) and "save it as UTF-8" in str(e.value)


def test_utf8_bom_config_file_is_read(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes("seed = 4\n".encode("utf-8-sig"))
    assert load_config(path).seed == 4


def test_toml_key_lines():
    from rlhfkit.core.config import toml_key_lines

    text = '\n'.join([
        'seed = 1  # a comment with [brackets] = signs',   # 1
        '"task" = "digits"',                                # 2
        'ppo.kl_coef = 0.1',                                # 3: a dotted key at top level
        '[ppo]  # the PPO section',                         # 4
        'total_steps = 7',                                  # 5
        'note = """',                                       # 6
        'fake = 1',                                         # 7: inside a multi-line string
        '"""',                                              # 8
        '[[mix.sources]]',                                  # 9
        'kind = "rm"',                                      # 10
        '[[ mix.sources ]]',                                # 11
        "'kind' = \"gold\"",                                # 12
        '[mix.sources.extra]',                              # 13: a sub-table of the last element
        'x = 1',                                            # 14
    ])
    lines = toml_key_lines(text)
    assert lines["seed"] == 1 and lines["task"] == 2 and lines["ppo.kl_coef"] == 3 and lines["ppo"] == 4
    assert lines["ppo.total_steps"] == 5 and lines["ppo.note"] == 6 and "ppo.fake" not in lines
    assert lines["mix.sources[0]"] == 9 and lines["mix.sources[0].kind"] == 10
    assert lines["mix.sources[1]"] == 11 and lines["mix.sources[1].kind"] == 12
    assert lines["mix.sources[1].extra.x"] == 14


CONFIG_FILE = """\
seed = 3

[sft]
lr = 1e-3

[ppo]
total_steps = 7
{line8}
"""


@pytest.mark.parametrize("line8,overrides,needle", [
    ("kl_coeff = 0.1", [], "c.toml:8: unknown key 'ppo.kl_coeff'; did you mean 'ppo.kl_coef'?"),
    ("kl_coef = 'big'", [], "c.toml:8: ppo.kl_coef = 'big': expected float, got str"),
    ("kl_coef = -1", [], "c.toml:8: ppo.kl_coef = -1.0: must be >= 0"),
    # cross-field: each value involved says where it came from
    ("minibatch_size = 48", [], "c.toml:8: ppo.minibatch_size = 48: must divide ppo.rollout_batch_size = 128 (default)"),
    ("minibatch_size = 48", ["ppo.rollout_batch_size=100"],
     "c.toml:8: ppo.minibatch_size = 48: must divide ppo.rollout_batch_size = 100 (--set)"),
    ("rollout_batch_size = 100", [],
     "ppo.minibatch_size = 32 (default): must divide ppo.rollout_batch_size = 100 (c.toml:8)"),
    ("", ["ppo.minibatch_size=48"], "--set ppo.minibatch_size = 48: must divide ppo.rollout_batch_size = 128 (default)"),
])
def test_errors_name_file_line_or_origin(tmp_path, line8, overrides, needle):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG_FILE.format(line8=line8))
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value).replace(f"{tmp_path}/", "")
    assert needle in message and "\n" not in message


def test_task_defaults_named_as_origin(monkeypatch):
    from rlhfkit.tasks.digits import DigitsTask

    monkeypatch.setattr(DigitsTask, "default_overrides", lambda self: {"ppo": {"rollout_batch_size": 100}})
    with pytest.raises(ConfigError, match=r"must divide ppo.rollout_batch_size = 100 \(task 'digits' default\)"):
        load_config()
    monkeypatch.setattr(DigitsTask, "default_overrides", lambda self: {"ppo": {"kl_coeff": 1}})
    with pytest.raises(ConfigError, match=r"task 'digits' defaults: unknown key 'ppo.kl_coeff'"):
        load_config()


def test_array_of_tables_error_names_line_and_element():
    from rlhfkit.core.config import Source

    text = '[[mix.sources]]\nkind = "rm"\n\n[[mix.sources]]\npath = "x"\nkindd = "gold"\n'
    with pytest.raises(ConfigError) as e:
        apply_dict(Root(), tomllib.loads(text), Source.file("f.toml", text))
    assert str(e.value) == "f.toml:6: unknown key 'mix.sources[1].kindd'; did you mean 'mix.sources[1].kind'?"
    text = '[mix]\ntags = ["a",\n  3]\n'
    with pytest.raises(ConfigError, match=r"^f.toml:2: mix.tags\[1\] = 3: expected str, got int$"):
        apply_dict(Root(), tomllib.loads(text), Source.file("f.toml", text))


# ----------------------------------------------------------------------------------------------------
# Settings under which a stage would do nothing, or crash later, are config errors.

def test_context_length_of_digits_is_computed(digits, tokenizer):
    import random

    from rlhfkit.data.batching import encode_prompt

    prompt_tokens = max(len(encode_prompt(tokenizer, p)) for p in digits.prompts(50, random.Random(0)))
    assert digits.context_length == prompt_tokens + digits.max_new_tokens + 1 == 12  # + the EOS a reward model reads


def test_policy_n_ctx_must_hold_prompt_and_completion():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["policy.n_ctx=8"])
    assert "--set policy.n_ctx = 8:" in str(e.value) and "needs 12 positions" in str(e.value)
    assert "the EOS a reward model reads" in str(e.value)
    with pytest.raises(ConfigError, match="needs 12 positions"):  # 11 holds prompt + reply, not the RM's EOS
        load_config(overrides=["policy.n_ctx=11"])
    assert load_config(overrides=["policy.n_ctx=12"]).policy.n_ctx == 12
    # a user's model brings its own context length; n_ctx is not used then
    assert load_config(overrides=["policy.n_ctx=8", "policy.path='/some/model'"]).policy.n_ctx == 8


@pytest.mark.parametrize("overrides,needle", [
    (["sft.n_demos=50"], "sft.batch_size = 64 (default): larger than sft.n_demos = 50 (--set)"),
    (["sft.n_demos=50"], "SFT would make no optimiser step; lower sft.batch_size to at most 50 or raise sft.n_demos"),
    (["ppo.minibatch_size=256"], "--set ppo.minibatch_size = 256: larger than ppo.rollout_batch_size = 128 (default)"),
    (["ppo.rollout_batch_size=16"], "ppo.minibatch_size = 32 (default): larger than ppo.rollout_batch_size = 16 (--set)"),
])
def test_settings_that_would_train_nothing(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)
    assert load_config(overrides=["sft.n_demos=64"]).sft.n_demos == 64  # one full batch is enough


def test_readme_stands_on_its_own():
    """The README (and the code that points at it) names no file outside the repository, and states the
    digits task fully: the rule, an example, the preference and what alignment should show."""
    root = README.parent
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):  # Markdown links to files
        if "://" not in target:
            assert (root / target).exists(), f"README links to {target}, which is not in the repository"
    sources = [README, *sorted((root / "rlhfkit").rglob("*.py"))]
    assert not [p.name for p in sources if "shared/docs" in p.read_text()], "points outside the repository"
    digits = text.split("## The `digits` task", 1)[1].split("\n## ", 1)[0]
    for needle in ("successor (mod 10)", "`4 5 9 1 = 6 2 7 8`", "last prompt digit plus one", "0.325",
                   "preferred_first_rate", "later_rule_validity", "well_formed_rate", "What alignment should show",
                   "ppo.kl_coef = 0"):
        assert needle in digits, needle


def test_method_help_names_every_method():
    from rlhfkit.algorithms import METHODS

    help_text = next(f.metadata["help"] for f in fields(Config) if f.name == "method")
    assert all(f"'{m}'" in help_text for m in METHODS)
