"""Spine layer: what the methods share beyond the math, so an algorithm file keeps only what makes it different.

    rollout.py         sample -> score -> log-probs of policy and reference -> values (every sampling method)
    reward_sources.py  the reward: the run's reward model, or several sources combined (reward.sources)
    online.py          the online loop's setup and bookkeeping (PPO, RLOO, GRPO)
    self_training.py   the round loop of rejection sampling and ReST: grow, select and fine-tune, save
    finetune.py        the SFT loop, shared by SFT and the self-training methods

May import: models, data, ops, core.
"""
