"""Hugging Face models for every role: policy, reference, reward model, value model.

There is no private model class. Built-in tasks get tiny GPT-2- or Llama-style models created from a
config section with random init; a user points `policy.path` at any local causal-LM directory.
Reward and value models are `AutoModelForSequenceClassification` with one label: the reward is the
head's output at the last real token, the value is the same head applied at every token.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.errors import ConfigError, RlhfkitError


# ----------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU. Anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device = {name!r} is not a device torch knows ({e}); use 'auto', 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available here; use device = 'auto' or 'cpu'")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 on CUDA with bf16 support, else fp32."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else None
    if precision == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise ConfigError("precision = 'bf16' but this GPU does not support bf16; use 'fp32' or 'auto'")
        return torch.bfloat16
    raise ConfigError(f"precision = {precision!r}; choose 'auto', 'fp32' or 'bf16'")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the forward passes (a no-op in fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    directory (rlhfkit.lora) is checked through its base."""
    path = Path(path)
    config_file = path / "config.json"
    if causal and (path / "adapter_config.json").is_file() and not config_file.is_file():
        from rlhfkit.lora import adapter_base

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
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        from rlhfkit.lora import load_adapter_model

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


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model):
    """Set every dropout probability to 0 (RL needs the sampling and training passes to agree).

    Dropout modules are not the only kind: Llama-style attention applies `config.attention_dropout`
    functionally (a float attribute read in forward), so float attributes named like dropout are zeroed on
    every module and on the config too (TRL and OpenRLHF disable dropout for the same reason).
    """
    configs = [getattr(model, "config", None)]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        configs.append(getattr(module, "config", None))
        for name, value in vars(module).items():
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    for config in {id(c): c for c in configs if c is not None}.values():
        for name, value in list(vars(config).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def freeze(model):
    """Eval mode, no grads: for the reference policy and the reward model during RL."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# Forward passes shared by every algorithm


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) next-token logits of a causal LM."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits


def scalar_head(model):
    """The linear scalar head of a sequence-classification model (`score` for decoders)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise RlhfkitError(f"{type(model).__name__} has no 'score' or 'classifier' head; use a decoder-style reward model")


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) head output at every token: values for the critic; the reward is read at the last token."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state  # (B, T, H)
    return scalar_head(model)(hidden).squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real (mask = 1) token in each row, for any padding side."""
    T = attention_mask.shape[1]
    ar = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model score at the last real token of each sequence."""
    values = token_scalars(model, input_ids, attention_mask)  # (B, T)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)
