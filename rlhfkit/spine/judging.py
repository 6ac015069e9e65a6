"""The AI judge a run's config names ([judge]): a local causal-LM directory or an OpenAI-compatible endpoint.

One place turns the [judge] section into a judge (rlhfkit.models.judge.PairJudge), so the feedback stage
(feedback.labeler = 'ai'), the evaluation (eval.judge) and `rlhfkit compare` judge the same way, with the same
template, cache and options. Both back-ends give the same labels for the same model (tests/test_judge_remote.py).

Layer: spine (imports models, core).
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.core.errors import ConfigError
from rlhfkit.models.judge import CONSTITUTIONAL_TEMPLATE, DEFAULT_TEMPLATE, JudgeTemplate, LocalJudge, load_template
from rlhfkit.models.judge_remote import RemoteJudge
from rlhfkit.models.load import check_model_dir, load_tokenizer
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.constitution import DEFAULT_CONSTITUTION, load_constitution


def open_judge(jc, rt: Runtime, cache: str | Path | None):
    """The judge of the [judge] section `jc` (rlhfkit.pipeline.config.JudgeConfig), its judgements cached in the
    SQLite file `cache` (None = no cache): a LocalJudge on jc.path, else a RemoteJudge on jc.base_url."""
    template = judge_template(jc)
    if jc.path:
        return LocalJudge(jc.path, template, rt, batch_size=jc.batch_size, cache=cache, cot_samples=jc.cot_samples,
                          cot_temperature=jc.cot_temperature)
    return RemoteJudge(jc.base_url, jc.model, template, api_key_env=jc.api_key_env, cache=cache,
                       max_concurrency=jc.max_concurrency, timeout_s=jc.timeout_s, max_retries=jc.max_retries,
                       cot_samples=jc.cot_samples, cot_temperature=jc.cot_temperature)


def judge_template(jc) -> JudgeTemplate:
    """The template of [judge]: judge.template, else rlhfkit's pairwise.toml, or constitutional.toml (which asks a
    principle's question) with judge.constitution. A template that asks a principle needs a constitution and the
    other way round: a ConfigError says which to set."""
    template = load_template(jc.template or (CONSTITUTIONAL_TEMPLATE if jc.constitution else DEFAULT_TEMPLATE))
    if jc.constitution and not template.asks_principle:
        raise ConfigError(f"judge.template = {jc.template!r} has no {{principle}} in its question, so the principles "
                          f"of judge.constitution = {jc.constitution!r} cannot be asked; add one (as "
                          f"{CONSTITUTIONAL_TEMPLATE} does), or leave judge.template empty")
    if template.asks_principle and not jc.constitution:
        raise ConfigError(f"judge.template = {jc.template!r} asks a {{principle}}: set judge.constitution to a "
                          f"constitution file (e.g. {DEFAULT_CONSTITUTION}), or use a template without one")
    return template


def judge_cache_path(jc, out: Path) -> Path:
    """Where the run's judgements are kept: judge.cache, else OUT/judge_cache.sqlite (outside every stage's
    directory, so a stage that fails or is redone keeps what was judged)."""
    return Path(jc.cache) if jc.cache else out / "judge_cache.sqlite"


def preflight_judge(jc) -> None:
    """What can be checked of the judge before anything runs: its template, and its directory and tokenizer (a
    local judge; whether the labels are single tokens is checked when it loads, before the first judgement). An
    endpoint is first reached when the judging starts."""
    judge_template(jc)
    if jc.constitution:
        load_constitution(jc.constitution)
    if jc.path:
        check_model_dir(jc.path, "judge.path", causal=True)
        load_tokenizer(jc.path, "judge.path")
