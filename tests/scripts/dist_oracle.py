"""Run under `accelerate launch --num_processes 2` by tests/test_engine.py: the distributed pieces of the online
methods on a FIXED batch, each process holding its half, written (by the main process) to argv[1] as JSON for the
test to compare with one process on the whole batch:

- masked_whiten with the moments summed over the processes (PPO's advantage whitening),
- PPO's reward normalisation (RunningMoments over the gathered scores) inside ppo_targets,
- Engine.step: a token-mean loss, 2 micro-batches a process, token-weighted; on each process's own rows
  (local=True, the online methods) and on the global batch the engine splits (the offline trainers). SGD and no
  clipping, so that a gradient off by a factor (the N processes DDP averages over) shows; and once more with a
  clipping norm small enough to bite (the norm must be the whole gradient's, not one process's shard).

argv[2], when given, is train.sharding ("none" = DDP, "zero2", "zero3": FSDP2 shards the models).
"""

import json
import sys

import torch

from rlhfkit.algorithms.ppo import PPOConfig, ppo_targets
from rlhfkit.models.engine import join_processes, make_engine
from rlhfkit.ops.advantages import RunningMoments, masked_whiten


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)  # (B, T)
    lengths = torch.tensor([1, 6, 2, 5, 3, 3, 6, 4])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    scores = torch.randn(8, generator=g)
    logprobs, ref_logprobs, values = (torch.randn(8, 6, generator=g) for _ in range(3))
    feats = torch.randn(8, 6, 3, generator=g)
    return x, mask, scores, logprobs, ref_logprobs, values, feats


def step_model(feats, x, mask, engine_of, rows, local, clip=0.0):
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    engine = engine_of(model, clip)

    def loss_fn(r):
        err = (model(feats[r]).squeeze(-1) - x[r]) ** 2
        return (err * mask[r]).sum() / mask[r].sum(), {}

    engine.step(rows, loss_fn, units=lambda r: mask[r].sum(), local=local, step_scheduler=False)
    whole = engine.full_weights()  # under sharding: gathered from the processes
    return torch.cat([whole[f"m.{name}"].flatten() for name, _ in model.named_parameters()]).tolist()


def compute(world: int, rank: int, engine_of):
    x, mask, scores, logprobs, ref_logprobs, values, feats = fixed_batch()
    mine = torch.arange(8).tensor_split(world)[rank]
    probe = engine_of(torch.nn.Linear(1, 1))
    total = probe.sum if world > 1 else None
    whitened = probe.gather(masked_whiten(x[mine], mask[mine], total=total))
    pc = PPOConfig(reward_norm=True)
    t = ppo_targets(scores[mine], torch.ones(len(mine), dtype=torch.bool), logprobs[mine], ref_logprobs[mine],
                    values[mine], mask[mine], pc, 0.1, RunningMoments(), total=total, gather=probe.gather)
    return {"whitened": whitened.tolist(), "advantages": probe.gather(t.advantages).tolist(),
            "scores": probe.gather(t.scores).tolist(),
            "params": step_model(feats, x, mask, engine_of, mine, local=True),
            "params_global": step_model(feats, x, mask, engine_of, torch.arange(8), local=False),
            "params_clipped": step_model(feats, x, mask, engine_of, torch.arange(8), local=False, clip=0.05)}


def main():
    join_processes("cpu")
    sharding = sys.argv[2] if len(sys.argv) > 2 else "none"
    engine_of = lambda m, clip=0.0: make_engine(  # noqa: E731
        {"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), None, torch.device("cpu"), accumulation=2,
        max_grad_norm=clip, sharding=sharding)
    probe = engine_of(torch.nn.Linear(1, 1))
    result = compute(probe.world, probe.rank, engine_of)
    if probe.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
