"""Hugging Face models for every role, from directories (or built tiny): policy, reference, reward model, value model.

There is no private model class. Built-in tasks get tiny GPT-2- or Llama-style models created from a
config section with random init; a user points `policy.path` at any local causal-LM directory.
Reward and value models are `AutoModelForSequenceClassification` with one label: the reward is the
head's output at the last real token, the value is the same head applied at every token
(rlhfkit/models/forward.py). A LoRA adapter directory (rlhfkit/models/lora.py) loads merged into its base.

Layer: models (imports core; within models: lora).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.models.lora import ADAPTER_CONFIG, adapter_base, is_adapter_dir

# ----------------------------------------------------------------------------------------------------
# Building tiny models


@dataclass
class TinyModelSpec:
    """Shape of a tiny model built from scratch (see config.ModelConfig for the documented fields)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ctx: int


def tiny_config(spec: TinyModelSpec, tokenizer):
    """A transformers config for a tiny GPT-2 or Llama model; dropout off (PPO ratios must start at 1)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if spec.arch == "gpt2":
        return GPT2Config(
            vocab_size=len(tokenizer), n_positions=spec.n_ctx, n_embd=spec.n_embd, n_layer=spec.n_layer,
            n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, **ids,
        )
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=spec.n_embd, intermediate_size=4 * spec.n_embd,
            num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head,
            max_position_embeddings=spec.n_ctx, tie_word_embeddings=True, attention_dropout=0.0, **ids,
        )
    raise ConfigError(f"policy.arch = {spec.arch!r}; choose 'gpt2' or 'llama'")


def build_tiny_policy(spec: TinyModelSpec, tokenizer, seed: int):
    """A randomly initialised causal LM of the given shape (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(spec, tokenizer))


# ----------------------------------------------------------------------------------------------------
# Loading from directories, with errors a user can act on


# What a loadable directory holds (what save_pretrained writes): weights, single-file or sharded, and
# the tokenizer's files (a fast tokenizer.json, or a slow tokenizer's vocabulary, with its config).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


WEIGHT_INDEX_GLOB = "*.index.json"  # model.safetensors.index.json / pytorch_model.bin.index.json of shards


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(path: str | Path, role: str, causal: bool) -> Path:
    """Fail early, clearly, when `path` is not a loadable (causal-LM) Hugging Face directory. A LoRA adapter
    directory (rlhfkit.models.lora) is checked through its base."""
    path = Path(path)
    config_file = path / "config.json"
    if causal and (path / ADAPTER_CONFIG).is_file() and not config_file.is_file():
        check_model_dir(adapter_base(path), f"{role} (the base of its LoRA adapter)", causal=True)
        return path
    if not path.is_dir():
        raise RlhfkitError(f"{role}: model directory {path} does not exist; point it at a local Hugging Face model directory")
    if not config_file.is_file():
        raise RlhfkitError(f"{role}: {path} has no config.json; it is not a Hugging Face model directory (save one with save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RlhfkitError(f"{role}: {config_file} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise RlhfkitError(f"{role}: {config_file} is not a model config (a JSON object)")
    if causal:
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            raise RlhfkitError(
                f"{role}: {path} holds a {', '.join(archs)}, not a causal language model; "
                "the policy must be a *ForCausalLM / *LMHeadModel directory"
            )
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob(WEIGHT_INDEX_GLOB)):
        raise RlhfkitError(
            f"{role}: {path} has a config.json but no weights (looked for {', '.join(WEIGHT_FILES)} and a sharded "
            f"checkpoint's {WEIGHT_INDEX_GLOB}); save the model there with save_pretrained"
        )
    return path


def quiet_transformers() -> None:
    """No per-load progress bars or "newly initialised head" warnings: rlhfkit reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_tokenizer(path: str | Path, role: str = "tokenizer", require_eos: bool = True):
    """The tokenizer saved in a model directory. A directory without tokenizer files is refused: given only
    config.json, transformers may build an empty tokenizer, and SFT would then train on nothing.
    require_eos = False for a model read by its own forward (an encoder such as BERT has no EOS, but a pad
    token)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise RlhfkitError(f"{role}: directory {path} does not exist; point it at a local Hugging Face model directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RlhfkitError(
            f"{role}: {path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer into it with tokenizer.save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise RlhfkitError(f"{role}: cannot load a tokenizer from {path} ({_one_line(e)})") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise RlhfkitError(f"{role}: the tokenizer in {path} has no vocabulary beyond its special tokens "
                           f"({len(tokenizer)} tokens); save the model's real tokenizer there with save_pretrained")
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None and require_eos:
        raise RlhfkitError(f"{role}: the tokenizer in {path} has no eos_token; set one and save it again")
    if tokenizer.pad_token is None:
        raise RlhfkitError(f"{role}: the tokenizer in {path} has neither a pad_token nor an eos_token; set one and save it again")
    return tokenizer


def load_policy(path: str | Path, device: torch.device, role: str = "policy"):
    """A causal LM from a local directory, on `device`, in fp32 (autocast handles bf16). A LoRA adapter
    directory (what a LoRA run saves) is merged into its base: a plain model comes back."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path, role, causal=True)
    if is_adapter_dir(path) and not (Path(path) / "config.json").is_file():
        return load_adapter_model(Path(path), device, role)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except OSError as e:  # a truncated or unreadable weights file, a shard the index names but is missing
        raise RlhfkitError(f"{role}: cannot load the model in {path} ({_one_line(e)})") from None
    return model.to(device)


def load_scalar_model(path: str | Path, device: torch.device, role: str, num_labels: int | None = 1,
                      trained_head: bool = False):
    """A sequence-classification model with one label (reward or value model); num_labels = None keeps the
    directory's own classes (a classifier reward).

    Loading a causal-LM (or a bare encoder) directory here keeps its backbone and adds a fresh scalar head,
    which is how the reward model is initialised from the SFT policy (InstructGPT, Ouyang et al. 2022,
    Sec. 3.5). trained_head = True (a model that scores): a head the directory does not hold is an error, not
    a random reward.
    """
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, role, causal=False)
    quiet_transformers()  # "newly initialised score head" is expected here, not a warning
    labels = {} if num_labels is None else {"num_labels": num_labels}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True, **labels)
    except (OSError, ValueError) as e:  # unreadable weights; a config transformers has no classifier for
        raise RlhfkitError(f"{role}: cannot load a sequence classifier from {path} ({_one_line(e)})") from None
    missing = sorted(info["missing_keys"])
    if trained_head and missing:  # e.g. a bare encoder: its classifier (or pooler) would be random
        raise RlhfkitError(f"{role}: {path} lacks trained weights for {', '.join(missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}; it is not a trained classifier (a bare backbone?): "
                           "train a reward model from it (reward.init) or point at a trained classifier")
    return model.to(device)


# ----------------------------------------------------------------------------------------------------
# LoRA adapters: loaded merged into their base


def load_adapter_model(path: Path, device: torch.device, role: str):
    """A plain model: the adapter in `path` merged into its base (loaded, recursively, by load_policy)."""
    from peft import PeftModel

    base = load_policy(adapter_base(path), device, f"{role} (the base of its LoRA adapter)")
    try:
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise RlhfkitError(f"{role}: cannot load the LoRA adapter in {path} onto its base ({' '.join(str(e).split())})") from None


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter merged into its base as a plain model directory (with the adapter's tokenizer)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(adapter_dir):
        raise RlhfkitError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} missing)")
    if out_dir.exists():
        raise RlhfkitError(f"{out_dir} exists; merge into a new directory")
    model = load_adapter_model(adapter_dir, torch.device("cpu"), "adapter")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(adapter_dir, "adapter").save_pretrained(tmp)
    tmp.rename(out_dir)  # complete or absent, never half written
    return out_dir
