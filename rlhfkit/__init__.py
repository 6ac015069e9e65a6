"""rlhfkit: the complete RLHF loop (SFT -> rankings -> reward model -> PPO -> evaluation).

`import rlhfkit` stays light: torch, transformers and plotting are imported by the modules that need
them. The plain-Python entry points are re-exported lazily:

    from rlhfkit import load_config, run_pipeline, run_stage
    from rlhfkit import sft, reward_model, dpo      # one trainer on a model and records in memory (api.py)
    from rlhfkit import grpo, rloo, ppo             # an online method on prompts and a reward (api.py)
    from rlhfkit import online_dpo, rejection_sampling, rest, best_of_n   # likewise, by selecting samples
"""

__version__ = "0.1.0"

_API = ("sft", "reward_model", "dpo", "grpo", "rloo", "ppo", "online_dpo", "rejection_sampling", "rest", "best_of_n",
        "Trained")
__all__ = ["load_config", "run_pipeline", "run_stage", *_API, "RlhfkitError", "__version__"]


def __getattr__(name):  # PEP 562: lazy re-exports keep `import rlhfkit` fast.
    if name == "load_config":
        from rlhfkit.pipeline.config import load_config

        return load_config
    if name in ("run_pipeline", "run_stage"):
        from rlhfkit.pipeline import stages

        return getattr(stages, name)
    if name in _API:
        from rlhfkit.pipeline import api

        return getattr(api, name)
    if name == "RlhfkitError":
        from rlhfkit.core.errors import RlhfkitError

        return RlhfkitError
    raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")
