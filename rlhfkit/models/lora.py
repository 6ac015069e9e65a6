"""LoRA (peft): low-rank adapters trained on a frozen base; the reference policy of a LoRA run is the same model
with the adapter disabled (AdapterDisabled), so no second copy of the model is held in memory.

    policy, reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed)  # rlhfkit/models/reference.py
    policy.save_pretrained(stage_dir / "model")                      # with LoRA: the adapter only (a few MB)
    load_policy(stage_dir / "model")                                 # rlhfkit/models/load.py: merges it into its base
    merge_adapter(adapter_dir, out_dir)                              # `rlhfkit merge`: a plain model directory

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models": W x + (alpha / r) B A x with B = 0 at the
start, so the policy equals its base (the SFT model) at step 0 exactly: its KL to the reference is 0 and DPO's
loss is ln 2, as with a full copy (tests/test_lora.py checks both). The adapter directory records the absolute
path of its base (adapter_config.json's base_model_name_or_path); a run that was moved or copied still finds its
base where it stands relative to the adapter (OUT/sft/model beside OUT/ppo/model: adapter_base), and
`rlhfkit merge` makes a directory that no longer needs it. peft is imported only when LoRA is on.

Layer: models (imports core only: the lowest module of the models package).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.core.errors import RlhfkitError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter directory was trained on. peft records its absolute path
    (base_model_name_or_path); when that is gone because the run was moved or copied (or shared with a
    colleague), the base is looked for where it stands relative to the adapter: the recorded path's last two or
    more components (e.g. sft/model) under each folder above the adapter, nearest first."""
    config_file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RlhfkitError(f"{config_file} is not a readable peft adapter config ({e})") from None
    if base and Path(base).is_dir():
        return Path(base)
    moved = _moved_base(Path(path), Path(base)) if base else None
    if moved is not None:
        return moved
    raise RlhfkitError(f"the LoRA adapter in {path} was trained on the base model {base!r}, which is not a local "
                       "directory any more (nor found beside the adapter where it stood, e.g. OUT/sft/model for "
                       "OUT/ppo/model); restore it, or merge the adapter into its base while it exists (`rlhfkit merge`)")


def _moved_base(adapter: Path, recorded: Path) -> Path | None:
    """The recorded base's place relative to the adapter, found again after a move: the shortest tail of the
    recorded path (2 components or more) that names a model directory under a folder above the adapter."""
    adapter = adapter.resolve()
    parts = recorded.parts
    for folder in adapter.parents:
        for k in range(2, len(parts)):
            candidate = folder.joinpath(*parts[-k:])
            if candidate.resolve() != adapter and (candidate / "config.json").is_file():
                return candidate
    return None


class AdapterDisabled(torch.nn.Module):
    """The base of a LoRA model: the same weights with the adapter switched off for each forward. The
    reference policy pi_ref of a LoRA run (it shares the policy's parameters: never freeze or train it)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


def wrap_lora(model, lc, base_dir: Path, seed: int):
    """`model` with a new trainable LoRA adapter (lc: config.LoRAConfig); every base weight frozen. The
    adapter's random A matrices are drawn from `seed` (not from whatever the global generator holds), so the
    same seed gives the same run."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, task_type="CAUSAL_LM",
                        target_modules=list(lc.target_modules) or None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # no default target modules for this architecture, or a name that matches nothing
        raise RlhfkitError(f"lora.target_modules = {list(lc.target_modules)}: {e}; name the linear layers to adapt, "
                           "e.g. ['q_proj', 'v_proj'] (Llama) or ['c_attn'] (GPT-2)") from None
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    return peft_model
