"""The AI judge a run's config names ([judge]): a local causal-LM directory or an OpenAI-compatible endpoint.

One place turns the [judge] section into a judge (rlhfkit.models.judge.PairJudge), so the feedback stage
(feedback.labeler = 'ai'), the evaluation (eval.judge) and `rlhfkit compare` judge the same way, with the same
template, cache and options. Both back-ends give the same labels for the same model (tests/test_judge_remote.py).

Layer: spine (imports models, core).
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.models.judge import DEFAULT_TEMPLATE, LocalJudge, load_template
from rlhfkit.models.judge_remote import RemoteJudge
from rlhfkit.models.load import check_model_dir, load_tokenizer
from rlhfkit.models.runtime import Runtime


def open_judge(jc, rt: Runtime, cache: str | Path | None):
    """The judge of the [judge] section `jc` (rlhfkit.pipeline.config.JudgeConfig), its judgements cached in the
    SQLite file `cache` (None = no cache): a LocalJudge on jc.path, else a RemoteJudge on jc.base_url."""
    template = load_template(jc.template or DEFAULT_TEMPLATE)
    if jc.path:
        return LocalJudge(jc.path, template, rt, batch_size=jc.batch_size, cache=cache, cot_samples=jc.cot_samples,
                          cot_temperature=jc.cot_temperature)
    return RemoteJudge(jc.base_url, jc.model, template, api_key_env=jc.api_key_env, cache=cache,
                       max_concurrency=jc.max_concurrency, timeout_s=jc.timeout_s, max_retries=jc.max_retries)


def judge_cache_path(jc, out: Path) -> Path:
    """Where the run's judgements are kept: judge.cache, else OUT/judge_cache.sqlite (outside every stage's
    directory, so a stage that fails or is redone keeps what was judged)."""
    return Path(jc.cache) if jc.cache else out / "judge_cache.sqlite"


def preflight_judge(jc) -> None:
    """What can be checked of the judge before anything runs: its template, and its directory and tokenizer (a
    local judge; whether the labels are single tokens is checked when it loads, before the first judgement). An
    endpoint is first reached when the judging starts."""
    load_template(jc.template or DEFAULT_TEMPLATE)
    if jc.path:
        check_model_dir(jc.path, "judge.path", causal=True)
        load_tokenizer(jc.path, "judge.path")
