"""Which process this is when a run is launched as several (`accelerate launch`, `torchrun`): read from the
environment the launcher sets, without importing torch.distributed or accelerate, so that the lowest layers
(the metrics log, the pipeline's bookkeeping) can ask "am I the main process?" cheaply. The process group itself,
the gradient all-reduce and the gathers live in rlhfkit/models/engine.py.

Layer: core (imports nothing of rlhfkit).
"""

from __future__ import annotations

import os


def world_size() -> int:
    """Processes in this run: WORLD_SIZE as the launcher sets it, 1 when started as a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in [0, world_size()); 0 when started as a plain process."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (its GPU under CUDA)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the run's files (logs, checkpoints, models, reports): rank 0, or the only one."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1
