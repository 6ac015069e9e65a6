"""Reward sources, several at once: what the online methods and the evaluation score responses with.

    [[reward.sources]]                       # one table per source (rlhfkit.config.RewardSourceConfig)
    kind = "reward_model"                    # this run's reward model (path empty), of one criterion
    criterion = "helpfulness"
    [[reward.sources]]
    kind = "classifier"                      # the probability of one class of any classifier
    path = "models/toxicity"
    label = "not toxic"
    output = "prob"
    name = "safety"
    [[reward.sources]]
    kind = "classifier"                      # path empty: this run's toxicity classifier (OUT/toxicity/model,
    label = "not toxic"                      # toxicity.enabled = true), its 'not toxic' logit: the seeds'
    name = "not_toxic"                       # "not hate" reward

Kinds: 'reward_model' (a reward model rlhfkit trained; read as it was trained, rlhfkit.models.scoring), 'sequence_classifier'
(any one-label classifier with its own tokenizer, read by its own forward: a BERT/MiniLM reward model),
'classifier' (one class's logit or probability), 'gold' (the task's gold scorer), 'judge' (direct RLAIF, Lee et
al. 2023, Sec. 2.3: a causal LM's expected 1-10 score of each reply under a score template, rescaled to [-1, 1];
rlhfkit.models.judge_score; no cache, as an online run scores new text at every step) and 'python' (a function of
yours: rlhfkit.spine.reward_functions). The scores combine by
`reward.combine`: 'sum' (weighted) or 'llama2' (Touvron et al. 2023, Sec. 3.2.2: on probabilities, the safety
probability where it is below a threshold, else the helpfulness probability; then its logit). No sources = the run's
reward model alone, as before.

`build_scorer(cfg, task, rm_dir, rt)` is the one place a scorer is made; it returns an object called as
`scorer(prompts, completions) -> (B,)`, and a combination also has `score_sources(...) -> ((B,), {name: (B,)})`,
which collect_rollouts uses to log `objective/scores/<name>`.

Llama 2's rule compares two probabilities in [0, 1], so 'llama2' puts both sources on that scale first: a
classifier source read with output = 'prob' is one already (Config.validate requires it of a classifier), any
other source's score s becomes sigmoid(s) (a Bradley-Terry score's probability of beating a response scored 0).
Comparing a probability with a raw score instead (as rlhfkit did before) let an unsafe reply outrank every safe
one whose raw helpfulness score was lower than its safety probability. Deviations from Llama 2: no IS_SAFETY(prompt)
tag (the rule looks at the safety probability alone), and the logit of the combined probability is not whitened
here (`ppo.reward_norm` normalises scores by running moments). As in Llama 2, a safe reply whose helpfulness
probability is below the threshold can still rank under an unsafe one: the rule is the paper's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.models.judge_score import DEFAULT_SCORE_TEMPLATE, LocalScoreJudge, load_score_template, score_label_ids
from rlhfkit.models.load import check_model_dir, load_tokenizer
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.scoring import ClassLabelScorer, RewardModelScorer, class_index, is_decoder_model
from rlhfkit.spine.reward_functions import PythonScorer, load_function

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config


# ----------------------------------------------------------------------------------------------------
# Combiners: pure functions of the sources' (B,) scores


def weighted_sum(scores: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """(B,) sum_i w_i * s_i over the sources."""
    return sum(weights[name] * s for name, s in scores.items())


LOGIT_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the logit, so a certain 0 or 1 stays finite


def llama2_combine(safety: torch.Tensor, helpfulness: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) Llama 2's rule (Touvron et al. 2023, eq. 4 and the logit before whitening, without the prompt's safety
    tag) on two (B,) probabilities in [0, 1]: R_c = the safety probability where it is below the threshold (an
    unsafe response is judged by safety alone), else the helpfulness probability; the reward is logit(R_c)."""
    combined = torch.where(safety < threshold, safety, helpfulness)
    return torch.logit(combined.clamp(LOGIT_EPS, 1 - LOGIT_EPS))


def as_probability(scores: torch.Tensor, is_probability: bool) -> torch.Tensor:
    """A source's (B,) scores on the [0, 1] scale the Llama 2 rule compares: as they are when the source gives
    probabilities (a classifier read with output = 'prob'), else sigmoid(score)."""
    return scores if is_probability else torch.sigmoid(scores)


class GoldScorer:
    """The task's gold scorer (task.gold_score) as a reward: an oracle, for experiments with a known truth."""

    def __init__(self, task, rt: Runtime):
        self.task, self.rt = task, rt

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        return torch.tensor([self.task.gold_score(p, c) for p, c in zip(prompts, completions, strict=True)],
                            dtype=torch.float32, device=self.rt.device)


class JudgeScorer:
    """A score judge as a reward (kind = 'judge'): each reply's expected score, rescaled to [-1, 1]."""

    def __init__(self, judge: LocalScoreJudge, few_shot: bool = True):
        self.judge, self.few_shot = judge, few_shot

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        scores = self.judge.scores(prompts, completions, self.few_shot)
        return torch.tensor(scores, dtype=torch.float32, device=self.judge.rt.device)  # (B,)


def score_template_path(source) -> Path:
    """A judge source's score template: its `template`, else the shipped score.toml."""
    return Path(getattr(source, "template", "") or DEFAULT_SCORE_TEMPLATE)


def open_score_judge(source, rt: Runtime, key: str, batch_size: int = 16) -> JudgeScorer:
    """The scorer of the kind = 'judge' source `source` (reward.sources[i], `key` in messages): a LocalScoreJudge
    on its path, with its template, no cache."""
    if not source.path:
        raise ConfigError(f"{key}.path is empty: kind = 'judge' reads a causal-LM directory (the judge); set its "
                          "path")
    judge = LocalScoreJudge(source.path, load_score_template(score_template_path(source)), rt, batch_size=batch_size)
    return JudgeScorer(judge, getattr(source, "few_shot", True))


class CombinedScorer:
    """Several named scorers and how their scores become one reward (reward.combine)."""

    def __init__(self, scorers: dict, weights: dict[str, float], combine: str = "sum", safety: str = "",
                 helpfulness: str = "", threshold: float = 0.15, probabilities: frozenset = frozenset()):
        self.scorers, self.weights, self.combine = scorers, weights, combine
        self.safety, self.helpfulness, self.threshold = safety, helpfulness, threshold
        self.probabilities = probabilities  # names of the sources whose scores are probabilities already

    def score_sources(self, prompts: list, completions: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) combined score and each source's (B,) score."""
        scores = {name: scorer(prompts, completions).float() for name, scorer in self.scorers.items()}
        if self.combine == "llama2":
            safety, helpfulness = (as_probability(scores[name], name in self.probabilities)
                                   for name in (self.safety, self.helpfulness))
            return llama2_combine(safety, helpfulness, self.threshold), scores
        return weighted_sum(scores, self.weights), scores

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        return self.score_sources(prompts, completions)[0]


# ----------------------------------------------------------------------------------------------------
# From the config


def run_reward_model(cfg: Config, rm_dir: Path, criterion: str = "") -> Path:
    """This run's reward model of `criterion`: rm_dir (OUT/reward/model), or with reward.criterion = '*' (one
    model per criterion) OUT/reward/<criterion>/model."""
    return rm_dir.parent / criterion / "model" if cfg.reward.criterion == "*" else rm_dir


def run_classifier(rm_dir: Path) -> Path:
    """This run's toxicity classifier, OUT/toxicity/model (the toxicity stage, rlhfkit/algorithms/classifier.py):
    every stage hands the scorer OUT/reward/model as rm_dir, so OUT is its grandparent."""
    return rm_dir.parent.parent / "toxicity" / "model"


def source_model_dir(cfg: Config, source, rm_dir: Path) -> Path:
    """The directory a source reads: its path, else this run's model of its kind (a reward model of its criterion,
    or the toxicity classifier)."""
    if source.path:
        return Path(source.path)
    return run_classifier(rm_dir) if source.kind == "classifier" else run_reward_model(cfg, rm_dir, source.criterion)


def build_scorer(cfg: Config, task, rm_dir: Path, rt: Runtime):
    """The scorer the online methods and the evaluation use: with no reward.sources the run's reward model
    (rm_dir) as before; else a CombinedScorer of the sources."""
    r = cfg.reward
    if not r.sources:
        return RewardModelScorer(rm_dir, rt)
    scorers = {}
    for i, (name, s) in enumerate(zip(r.source_names(), r.sources)):
        if s.kind == "gold":
            scorers[name] = GoldScorer(task, rt)
        elif s.kind == "judge":
            scorers[name] = open_score_judge(s, rt, f"reward.sources[{i}]", cfg.judge.batch_size)  # [judge]'s
        elif s.kind == "python":
            key = f"reward.sources[{i}]"
            scorers[name] = PythonScorer(load_function(s.function, key), s.function, key, rt.device,
                                         fields=task.prompt_fields)
        elif s.kind == "classifier":
            scorers[name] = ClassLabelScorer(source_model_dir(cfg, s, rm_dir), rt, s.label, s.output)
        else:  # a reward model rlhfkit trained is read as it was trained; any other classifier by its forward
            scorers[name] = RewardModelScorer(source_model_dir(cfg, s, rm_dir), rt,
                                              decoder=None if s.kind == "reward_model" else False)
    weights = {name: s.weight for name, s in zip(r.source_names(), r.sources)}
    probabilities = frozenset(name for name, s in zip(r.source_names(), r.sources) if s.output == "prob")
    return CombinedScorer(scorers, weights, r.combine, r.safety_source, r.helpfulness_source, r.safety_threshold,
                          probabilities)


def value_reward_model(cfg: Config, rm_dir: Path) -> Path:
    """The reward model PPO's value model starts from (ppo.value_init = 'reward'): the run's reward model,
    or with reward.sources the first 'reward_model' source (Config.validate makes sure there is one)."""
    first = next((s for s in cfg.reward.sources if s.kind == "reward_model"), None)
    return rm_dir if first is None else source_model_dir(cfg, first, rm_dir)


def check_value_init(path: Path, policy_tokenizer=None) -> None:
    """ppo.value_init = 'reward' needs a decoder reward model that reads the policy's tokens (compared when
    policy_tokenizer is given): the value head is applied at every response token of the policy's own sequence.
    An encoder, or another vocabulary, cannot."""
    if not is_decoder_model(path):
        raise ConfigError(f"ppo.value_init = 'reward' but the reward model in {path} is an encoder read by its own "
                          "forward on its own tokenizer; the value model reads the policy's tokens at every position, "
                          "so set ppo.value_init = 'policy'")
    if policy_tokenizer is not None and load_tokenizer(path, "reward model").get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(f"ppo.value_init = 'reward' but the reward model in {path} uses another tokenizer than "
                          "the policy; the value model reads policy tokens, so set ppo.value_init = 'policy'")


def preflight_sources(cfg: Config) -> None:
    """What can be checked before any stage runs: each source's directory (a model, its tokenizer), a
    classifier's label, a judge's score template and that its labels are one or two tokens for its tokenizer, and
    that PPO's value model can start from the reward model (not an encoder)."""
    from transformers import AutoConfig

    r = cfg.reward
    for i, (name, s) in enumerate(zip(r.source_names(), r.sources)):
        role = f"reward.sources[{i}] ({name})"
        if s.kind == "python":  # importable, and a callable: a typo fails before SFT
            load_function(s.function, f"reward.sources[{i}]")
            continue
        template = load_score_template(score_template_path(s)) if s.kind == "judge" else None
        if not s.path:
            if template is not None:
                raise ConfigError(f"reward.sources[{i}].path is empty: kind = 'judge' reads a causal-LM directory "
                                  "(the judge); set its path")
            continue
        check_model_dir(s.path, role, causal=s.kind == "judge")
        needs_eos = s.kind in ("reward_model", "judge") and is_decoder_model(s.path)
        tokenizer = load_tokenizer(s.path, role, require_eos=needs_eos)
        if template is not None:
            score_label_ids(tokenizer, template, s.path)
        if s.kind == "classifier":
            class_index(AutoConfig.from_pretrained(s.path).id2label, s.label, Path(s.path))
    if cfg.method == "ppo" and cfg.ppo.value_init == "reward":
        first = next((s for s in r.sources if s.kind == "reward_model"), None)
        path = first.path if first is not None and first.path else (r.init if r.init != "sft" else "")
        if path and not is_decoder_model(path):
            check_value_init(Path(path))
