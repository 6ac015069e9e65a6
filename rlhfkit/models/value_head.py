"""PPO's critic as a head on the policy's own body (ppo.value_init = 'shared'): a linear map from the policy's final
hidden states to one value per token, so that one forward of the policy gives both the log-probs and the values
(rlhfkit.models.forward.forward_response), where a separate value model costs a second network's forward and
backward in every rollout and update. The value loss then trains the policy's body too, weighted by ppo.vf_coef
(the design of TRL's earlier PPOTrainer, AutoModelForCausalLMWithValueHead, whose vf_coef was 0.1 for that reason).

The head is saved in a checkpoint like any trained model (save_pretrained, from_pretrained: one safetensors file
and its shape), and is not part of the exported policy, which stays a plain causal LM.

Layer: models (imports core).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.core.errors import RlhfkitError

WEIGHTS, SHAPE = "value_head.safetensors", "value_head.json"


class ValueHead(torch.nn.Module):
    """values = linear(hidden), (..., H) -> (...,) in fp32. Not a model by itself: forward_response feeds it the
    policy's final hidden states (after the final norm, as the LM head reads them)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)

    @classmethod
    def on(cls, policy, std: float | None = None) -> ValueHead:
        """A new head for `policy` (a transformers causal LM or a peft model around one), on its device: weights
        N(0, std) (the policy config's initializer_range, as transformers starts a reward model's score head;
        0.02 without one), bias 0. Seed the global generator first for a reproducible start."""
        embeddings = policy.get_input_embeddings()
        config = getattr(policy, "config", None)
        std = std if std is not None else getattr(config, "initializer_range", None) or 0.02
        head = cls(embeddings.embedding_dim).to(embeddings.weight.device)
        with torch.no_grad():
            head.linear.weight.normal_(0.0, std)
            head.linear.bias.zero_()
        return head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).float()

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        """Write the head into directory `path` (state_dict: its whole weights where they are held elsewhere, as
        under train.sharding; rlhfkit.models.engine.sharded_state_dict)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / WEIGHTS))
        (path / SHAPE).write_text(json.dumps({"hidden_size": self.linear.in_features}) + "\n")

    @classmethod
    def from_pretrained(cls, path, device) -> ValueHead:
        """The head saved by save_pretrained in directory `path`, on `device`."""
        path = Path(path)
        if not (path / WEIGHTS).is_file() or not (path / SHAPE).is_file():
            raise RlhfkitError(f"{path} holds no value head ({WEIGHTS} and {SHAPE}): a checkpoint of a PPO run with "
                               "ppo.value_init = 'shared' has one; resume with the value_init that wrote it")
        head = cls(json.loads((path / SHAPE).read_text())["hidden_size"])
        head.load_state_dict(load_file(str(path / WEIGHTS)))
        return head.to(device)
