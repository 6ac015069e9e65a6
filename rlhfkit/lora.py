"""LoRA policies (peft): low-rank adapters trained on a frozen base, and the reference policy computed by
disabling the adapter on the same weights, so no second copy of the model is held in memory.

    policy, reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed)  # PPO, DPO, ...: policy and pi_ref
    policy.save_pretrained(stage_dir / "model")                      # with LoRA: the adapter only (a few MB)
    load_policy(stage_dir / "model")                                 # rlhfkit.models: merges an adapter into its base
    merge_adapter(adapter_dir, out_dir)                              # `rlhfkit merge`: a plain model directory

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models": W x + (alpha / r) B A x with B = 0 at the
start, so the policy equals its base (the SFT model) at step 0 exactly: its KL to the reference is 0 and DPO's
loss is ln 2, as with a full copy (tests/test_lora.py checks both). The adapter directory records the absolute
path of its base (adapter_config.json's base_model_name_or_path); `rlhfkit merge` makes a directory that no
longer needs it. peft is imported only when LoRA is on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.errors import RlhfkitError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter directory was trained on; it must still exist."""
    config_file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RlhfkitError(f"{config_file} is not a readable peft adapter config ({e})") from None
    if not base or not Path(base).is_dir():
        raise RlhfkitError(f"the LoRA adapter in {path} was trained on the base model {base!r}, which is not a local "
                           "directory any more; restore it, or merge the adapter into its base while it exists "
                           "(`rlhfkit merge`)")
    return Path(base)


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


def policy_and_reference(sft_dir: Path, lc, rt, seed: int, resume_from: Path | None = None):
    """The policy to train (from `resume_from` when resuming) and the reference pi_ref = the SFT policy.
    Without LoRA (lc.r == 0): two full models, the reference a frozen copy. With LoRA: one model; the
    policy trains an adapter, the reference is the same model with the adapter disabled."""
    from rlhfkit.models import freeze, load_policy
    from rlhfkit.rollout import FrozenReference

    if lc.r == 0:
        policy = load_policy(resume_from or sft_dir, rt.device, "policy")
        return policy, FrozenReference(freeze(load_policy(sft_dir, rt.device, "reference policy")))
    base = load_policy(sft_dir, rt.device, "sft policy")
    if resume_from is not None:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        policy = wrap_lora(base, lc, sft_dir, seed)
    return policy, FrozenReference(AdapterDisabled(policy))


def load_adapter_model(path: Path, device: torch.device, role: str):
    """A plain model: the adapter in `path` merged into its base (loaded, recursively, by load_policy)."""
    from peft import PeftModel

    from rlhfkit.models import load_policy

    base = load_policy(adapter_base(path), device, f"{role} (the base of its LoRA adapter)")
    try:
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise RlhfkitError(f"{role}: cannot load the LoRA adapter in {path} onto its base ({' '.join(str(e).split())})") from None


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter merged into its base as a plain model directory (with the adapter's tokenizer)."""
    from rlhfkit.models import load_tokenizer

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
