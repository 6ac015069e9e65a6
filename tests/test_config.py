"""Typed config: layering, overrides, and clear errors for bad input."""

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest

from rlhfkit.config import Config, config_diff, config_to_toml, load_config, parse_override
from rlhfkit.errors import ConfigError

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
    (["ppo.kl_coeff=1"], "did you mean 'kl_coef'"),
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
    with pytest.raises(ConfigError, match=r"u.toml: unknown key 'ppo.learning_rate'"):
        load_config(unknown)


def test_parse_override_values():
    assert parse_override("ppo.adaptive_kl=true") == {"ppo": {"adaptive_kl": True}}
    assert parse_override("policy.path=/tmp/my model") == {"policy": {"path": "/tmp/my model"}}
    assert parse_override("ppo.reward_threshold=inf") == {"ppo": {"reward_threshold": math.inf}}


def test_every_field_documented_in_readme():
    """The README's config reference lists every field (a meta-test, datasette style)."""
    text = README.read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    cfg = Config()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    expected = set()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            expected |= {f"{f.name}.{sf.name}" for sf in fields(value)}
        else:
            expected.add(f.name)
    assert expected - documented == set(), "undocumented config fields"
    assert documented - expected == set(), "README documents fields that do not exist"
    # and the defaults shown are the real ones
    from rlhfkit.config import _toml_value

    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", text, flags=re.M))
    for key, shown in rows.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert shown == _toml_value(obj), f"README default of {key}"
