"""A model's generation_config.json as sampling defaults: what the pipeline's [sampling] section and `rlhfkit label
create --policy` start from when the model brings one (no torch, no transformers: a JSON file read)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.core.errors import ConfigError

# generation_config.json key (transformers' GenerationConfig) -> [sampling] field. Its temperature is not taken:
# the stages' temperatures (feedback.temperature, ppo.temperature, ...) stay rlhfkit's 1.0, as TRL's trainers keep
# theirs whatever the model's file says; the online methods optimise, and take log-probs and KL, at that
# temperature, and a chat model's recommended 0.6-0.7 is for answering, not for exploring.
GENERATION_KEYS = {"top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                   "stop_strings": "stop"}


def generation_defaults(path: str | Path) -> dict:
    """The [sampling] values a model's generation_config.json sets (GENERATION_KEYS, those present and not null;
    a single stop string as a list of one). A missing or unreadable file sets none; a file that is not a JSON
    object is a ConfigError naming it (types and ranges are checked as any other layer's, naming it too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # no file, a directory that does not exist, no permission
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the model's generation config or remove "
                          "it (it gives the [sampling] defaults)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of generation settings, got {type(data).__name__}")
    out = {ours: data[theirs] for theirs, ours in GENERATION_KEYS.items() if data.get(theirs) is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out
