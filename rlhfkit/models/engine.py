"""One optimiser step over a global batch, in one process or as one rank of several: gradient accumulation and
data parallelism on torch.distributed, through `accelerate` (DDP) or torch's FSDP2 (train.sharding, below).

Every trainer makes its steps through Engine.step(idx, loss_fn): `idx` is the step's global batch (the same on
every rank: each draws it from the same seeded generator), `loss_fn(rows)` the method's loss on some of its rows,
a mean over them. The engine

    1. takes this rank's contiguous share of idx (1/N of it under `accelerate launch --num_processes N`),
    2. splits it into `accumulation` micro-batches (train.gradient_accumulation_steps),
    3. runs each micro-batch's loss and backward, weighted by the micro-batch's share of the GLOBAL batch
       (rows, or the loss's own units such as completion tokens for token-mean losses) times N, because DDP
       averages gradients over the N ranks; the all-reduce happens on the last micro-batch only (no_sync before),
    4. clips the global gradient norm and steps the optimiser (and the schedule),

so that 1 x 8, 8 x 1 and 2 processes x 4 make the same update up to float rounding (tests/test_engine.py). The
weights are the point: accelerate's own `accumulate()` divides every micro-batch by their count, which weights a
token-mean loss wrongly when micro-batches hold different numbers of tokens (the gradient-accumulation bug
transformers fixed in v4.46, "Fixing Gradient Accumulation", Hugging Face blog, Oct 2024).

The loss runs INSIDE the prepared (DDP-wrapped) module's forward: _Compute's forward is a closure call, so DDP's
hooks see every forward a trainer makes, whatever it reads of the models (the chunked log-prob path calls the
transformer body and the head separately). In one process accelerate is not involved at all: with one micro-batch a step is the same
float operations as a plain `loss.backward()` (no weight is applied), so single-process results do not change.

Sharding (train.sharding, several processes only). "none" is DDP: every process holds the whole model, its gradients
and its optimiser state. "zero2" and "zero3" shard them across the processes with torch's FSDP2 (`fully_shard`, one
unit per transformer block plus one for the rest), the sharding of DeepSpeed ZeRO stage 2 and 3 (Rajbhandari et
al., 2020): each process keeps 1/N of the optimiser state and of the gradients (reduce-scattered, not
all-reduced); "zero2" keeps a block's gathered weights from its forward to its backward (FSDP's SHARD_GRAD_OP),
"zero3" frees them after the forward and gathers them again in the backward (FULL_SHARD). torch's FSDP2 is called
directly because accelerate runs neither FSDP nor DeepSpeed on CPU (it turns both into plain DDP there); on GPUs
accelerate's own FSDP / DeepSpeed configs (configs/accelerate/) are the other way. Between steps the weights outside
the blocks (embeddings, final norm, heads) stay gathered, so that evaluation and generation use the models as they
are (each block gathers itself in its forward hook), on every process together; save_pretrained and the checkpoints
gather the whole state onto the main process.

Layer: models (imports core only).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch

from rlhfkit.core import dist
from rlhfkit.core.errors import ConfigError
from rlhfkit.models.runtime import release_free_memory, resolve_device

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]  # rows -> (mean loss over them, stats: 0-d tensors)

_ACCELERATOR = None


def accelerator(device: torch.device):
    """The process's accelerate.Accelerator (one per process: accelerate keeps its state process-wide). Under
    `accelerate launch` it joins the process group (gloo on CPU, NCCL on CUDA); in a plain process it is one rank."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        # The main process may work alone for long (the evaluation, simulated feedback) while the others wait at a
        # barrier: the default 30-minute collective timeout would kill a healthy run.
        _ACCELERATOR = Accelerator(cpu=device.type == "cpu",
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])
    return _ACCELERATOR


class _Compute(torch.nn.Module):
    """The trained models as one module whose forward runs a closure: what accelerate prepares (wraps in DDP), so
    that every loss a trainer computes with those models passes through the wrapper's forward."""

    def __init__(self, models: dict):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)

    def forward(self, fn, *args):
        return fn(*args)


@dataclass
class Engine:
    """The optimiser steps of one trainer (see the module docstring). Build it with `make_engine`."""

    models: dict  # the trained models by name (unwrapped: generation and save_pretrained use these)
    params: list
    optimizer: object
    scheduler: object | None
    max_grad_norm: float
    accumulation: int
    world: int
    rank: int
    _accelerator: object = field(repr=False, default=None)  # None in one process
    _wrapped: object = field(repr=False, default=None)  # the prepared _Compute when world > 1
    # after each micro-batch, hand the C heap's free pages back to the OS (CPU with gradient checkpointing: memory
    # was asked for over time; rlhfkit.models.runtime.release_free_memory says why)
    trim_memory: bool = False
    sharding: str = "none"  # "none" (DDP or one process), "zero2", "zero3": see the module docstring

    @property
    def sharded(self) -> bool:
        return self.sharding != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def split(self) -> bool:
        """Whether a step's batch is cut (micro-batches or processes): a loss with a batch-wide statistic (KTO's
        z0) must then compute it over the whole batch itself."""
        return self.world * self.accumulation > 1

    def check_batch(self, batch_size: int, key: str) -> None:
        """Refuse a batch that cannot give every rank's every micro-batch at least one row."""
        parts = self.world * self.accumulation
        if batch_size < parts:
            raise ConfigError(
                f"{key} = {batch_size} is smaller than {self.world} process{'es' if self.world > 1 else ''} x "
                f"train.gradient_accumulation_steps = {self.accumulation}: some micro-batch would be empty; raise "
                f"{key} or lower train.gradient_accumulation_steps (or the processes)")

    def forward(self, fn: LossFn, rows: torch.Tensor):
        """fn(rows), through the DDP wrapper when there is one."""
        return fn(rows) if self._wrapped is None else self._wrapped(fn, rows)

    def step(self, idx: torch.Tensor, loss_fn: LossFn, units: Callable[[torch.Tensor], torch.Tensor] | None = None,
             *, step_scheduler: bool = True, local: bool = False) -> dict[str, torch.Tensor]:
        """One optimiser step on the global batch `idx` (1-D rows). `units(rows)`: what loss_fn's mean is over for
        those rows (e.g. completion tokens), default the rows themselves. local: `idx` is already this process's
        share (the online methods: each process holds its own rollouts), the global batch being every process's
        together. Returns "loss" and each of loss_fn's stats averaged over the global batch with the same weights
        as the gradient (0-d tensors, no device sync)."""
        mine = idx if local else idx.tensor_split(self.world)[self.rank]
        parts = mine.tensor_split(self.accumulation)
        if self.world == 1:  # a last batch smaller than the micro-batches (the classifier keeps it): no empty part
            parts = [rows for rows in parts if len(rows)]
        total = units(idx) if units is not None else len(idx)
        if local and self.world > 1:  # the global batch's units: every process's share summed
            total = self.sum(torch.as_tensor(total, dtype=torch.float32, device=idx.device))
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        seen: list[set] = []
        for i, rows in enumerate(parts):
            share = (units(rows) if units is not None else len(rows)) / total  # exactly 1 for one part of one rank
            last = i == len(parts) - 1
            with self._sync(last):
                loss, stats = self.forward(loss_fn, rows)
                self._backward(loss * (share * self.world) if self.split else loss)
            if self.trim_memory:
                release_free_memory()
            seen.append({"loss", *stats})
            for name, value in {"loss": loss, **stats}.items():
                value = value.detach().float() * share if self.split else value.detach()
                sums[name] = sums[name] + value if name in sums else value
        if self.max_grad_norm > 0:
            if self._accelerator is None or self.sharded:  # FSDP2: the norm over every shard (DTensor gradients)
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            else:  # the global norm of the all-reduced (FSDP: sharded) gradients
                self._accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if step_scheduler and self.scheduler is not None:
            self.scheduler.step()
        if self.sharded:  # the weights outside the blocks gathered again, for whatever runs before the next step
            self._wrapped.unshard()
        if not self.split:
            return sums
        # a stat some part lacks (KTO's rewards/chosen of a part without a thumb up) has no batch mean: dropped
        keep = set.intersection(*seen)
        if self.world > 1:
            everyone: list = [None] * self.world
            torch.distributed.all_gather_object(everyone, sorted(keep))
            keep = set.intersection(*map(set, everyone))
        return self.reduce_sum({k: v for k, v in sums.items() if k in keep}) if self.world > 1 else \
            {k: v for k, v in sums.items() if k in keep}

    def _sync(self, last: bool):
        """Gradient synchronisation on the step's last micro-batch only (the earlier ones accumulate locally)."""
        if last or self._wrapped is None:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self._wrapped)
        return self._accelerator.no_sync(self._wrapped)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._accelerator is None or self.sharded:
            loss.backward()
        else:
            self._accelerator.backward(loss)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the processes (itself in one process)."""
        if self.world == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value

    def reduce_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value summed over the ranks (one all-reduce for all of them)."""
        names = list(values)
        stacked = torch.stack([values[n].double().reshape(()) for n in names])  # float64: logged figures keep their digits
        torch.distributed.all_reduce(stacked)
        return dict(zip(names, stacked.unbind()))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors concatenated on dim 0 in rank order (every rank gets the whole); itself in one process.
        Ranks may hold different lengths (padded to the longest for the all-gather, then cut)."""
        if self.world == 1:
            return tensor
        acc = self._accelerator
        sizes = acc.gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()  # (world,)
        parts = acc.gather(acc.pad_across_processes(tensor, dim=0)).split(max(sizes))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def barrier(self) -> None:
        """Wait for the processes this engine trains with (none when alone)."""
        if self.world > 1:
            barrier()

    # ------------------------------------------------------------------ using the models between steps
    def _units(self) -> list:
        """The FSDP units (each block, and the _Compute root) when sharded, else []."""
        return [m for m in self._wrapped.modules() if hasattr(m, "set_reshard_after_forward")] if self.sharded else []

    @contextlib.contextmanager
    def gathered(self):
        """Within the block (evaluation, sampling: many forwards and no backward) every block's weights stay gathered,
        and are sharded again after it. Without it a block gathers itself for each forward; under zero3 it then frees
        its weights after each one (a sampler's every token), and under zero2 it would keep them gathered until the
        next step's backward. No-op unless sharded; call on every process together."""
        units = self._units()
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(self.sharding == "zero3", recurse=False)
                if unit is not self._wrapped:
                    unit.reshard()

    def keep_gathered(self) -> None:
        """Training is over: every block's weights gathered for good (the final evaluation, generation; what one
        process would hold). No-op unless sharded; call on every process together."""
        for unit in self._units():
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    # ------------------------------------------------------------------ the state, whole on every process
    def trainable(self) -> dict[str, torch.Tensor]:
        """The trained parameters by "model.parameter" name. Under sharding ask again after anything that gathers
        or shards (a gathered unit's parameters are other tensors than its shards)."""
        return {f"{name}.{p_name}": p for name, model in self.models.items()
                for p_name, p in model.named_parameters() if p.requires_grad}

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The trained parameters as whole tensors on the CPU (under sharding gathered from every process: call it on
        all of them together)."""
        return {k: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu() for k, p in self.trainable().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (trainable()'s names: whole tensors, e.g. full_weights', or clones of the parameters) into
        the trained parameters, each process keeping its shard. Under sharding every unit is sharded first, so that
        no gathered copy of the old weights outlives the copy (call on every process together)."""
        for unit in self._units():
            unit.reshard()
        with torch.no_grad():
            for k, p in self.trainable().items():  # after the reshard: the sharded parameters
                value = weights[k]
                if _is_dtensor(p) and not _is_dtensor(value):
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
                p.copy_(value if _is_dtensor(value) else value.to(p.device))
        if self.sharded:
            self._wrapped.unshard()

    def optimizer_state(self) -> dict:
        """The optimiser's state dict, whole (under sharding each DTensor gathered: call on every process together;
        they hold the same entries in the same order)."""
        state = self.optimizer.state_dict()
        if self.sharded:
            state["state"] = {i: {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in entry.items()}
                              for i, entry in state["state"].items()}
        return state

    def load_optimizer_state(self, state: dict) -> None:
        """Load optimizer_state()'s dict (every process reads the same whole one and keeps its shards)."""
        if self.sharded:
            from torch.distributed.tensor import distribute_tensor

            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            state = {**state, "state": {
                i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh, params[i].placements)
                    if _is_dtensor(params[i]) and torch.is_tensor(v) and v.shape == params[i].shape else v
                    for k, v in entry.items()}
                for i, entry in state["state"].items()}}
        self.optimizer.load_state_dict(state)


SHARDING = ("none", "zero2", "zero3")


def make_engine(models: dict, optimizer, scheduler, device: torch.device, *, accumulation: int = 1,
                max_grad_norm: float = 1.0, checkpointing: bool = False, alone: bool = False,
                sharding: str = "none") -> Engine:
    """An Engine over the trained `models` (name -> module, every parameter that requires grad trained by
    `optimizer`). Under several processes the models are prepared by accelerate (DDP: rank 0's weights broadcast
    to all, gradients all-reduced) together with the optimiser; alone, nothing is wrapped and accelerate is not
    imported. checkpointing: transformers' gradient checkpointing on every model that has it. alone: this process
    trains by itself even under `accelerate launch` (a stage the others do not run). sharding: "zero2" / "zero3"
    shard the trained models with FSDP2 instead of DDP when there are several processes (the module docstring);
    the optimiser's parameters are rebound to the sharded ones, so `optimizer` must not have stepped yet."""
    if checkpointing:
        for model in models.values():
            enable_checkpointing(model)
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    world, rank = (1, 0) if alone else (dist.world_size(), dist.rank())
    acc = wrapped = None
    if sharding not in SHARDING:
        raise ConfigError(f"train.sharding = {sharding!r}: expected one of {', '.join(map(repr, SHARDING))}")
    if world == 1:
        sharding = "none"  # one process: nothing to shard across
    if world > 1:
        acc = accelerator(device)
        acc.free_memory()  # the accelerator would keep every earlier stage's models alive (and the process group)
        if sharding == "none":
            wrapped, optimizer = acc.prepare(_Compute(models), optimizer)
        else:
            wrapped, params = _shard(models, optimizer, reshard_after_forward=sharding == "zero3")
    return Engine(models, params, optimizer, scheduler, max_grad_norm, accumulation, world, rank, acc, wrapped,
                  trim_memory=(checkpointing or sharding != "none") and torch.device(device).type == "cpu",
                  sharding=sharding)


_SHARDED_ROOTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its FSDP root (_Compute)


def _shard(models: dict, optimizer, *, reshard_after_forward: bool):
    """FSDP2 over the trained models: one unit per transformer block (the classes transformers names in
    `_no_split_modules`), one for everything else (the _Compute root, whose forward every loss runs in). FSDP2
    replaces each parameter by a sharded one, so the optimiser's param groups are pointed at the new ones."""
    from torch.distributed.fsdp import fully_shard

    trained = {id(p) for m in models.values() for p in m.parameters() if p.requires_grad}
    if any(optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError("make_engine: shard before the optimiser's first step (its state would be lost)")
    compute = _Compute(models)
    before = {id(p): name for name, p in compute.named_parameters()}
    for model in models.values():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = set(getattr(base, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(compute, reshard_after_forward=reshard_after_forward)
    for model in models.values():
        _SHARDED_ROOTS[model] = compute
    after = dict(compute.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [after[before[id(p)]] for p in group["params"]]
    with torch.no_grad():  # FSDP sets itself up on the root's first forward, which must come before any block's own
        compute(lambda: None)  # (the online methods sample before their first step)
    compute.unshard()  # the weights outside the blocks, gathered for use between steps (module docstring)
    params = [after[name] for pid, name in before.items() if pid in trained]
    return compute, params


@contextlib.contextmanager
def _fsdp_no_sync(module):
    """FSDP2's counterpart of DDP's no_sync: gradients accumulate unsharded, reduce-scattered on the last part."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _is_dtensor(t) -> bool:
    """Whether `t` is a sharded tensor (FSDP2's parameters, gradients and optimiser state under train.sharding)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sharded_state_dict(model) -> dict | None:
    """The whole state dict of a model trained under sharding, on the main process (gathered from every process onto
    its CPU; the other processes get None values: call on all of them together), None for a model that is not
    sharded."""
    root = _SHARDED_ROOTS.get(model)
    if root is None:
        return None
    # every process walks the same keys in the same order, so the all-gathers pair up; the blocks' state dict hooks
    # leave them sharded (DTensor), whole tensors pass as they are. Tied weights (embeddings and head) stay one tensor,
    # so that save_pretrained recognises them as tied and writes them once.
    state, whole = {}, {}
    main = dist.is_main_process()
    for k, v in model.state_dict(keep_vars=True).items():  # the parameters themselves: a tied one is one object
        if id(v) not in whole:
            full = (v.full_tensor() if _is_dtensor(v) else v).detach()
            whole[id(v)] = full.cpu() if main else None  # only the main process writes: the others let go at once
        state[k] = whole[id(v)]
    root.unshard()  # the weights outside the blocks, gathered again for use between steps
    return state


def enable_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward (transformers' gradient checkpointing,
    non-reentrant: works with frozen inputs and LoRA). A model without it (a custom head) is left as it is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its transformer
    if not getattr(base, "supports_gradient_checkpointing", False):
        return
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model) -> bool:
    """Whether enable_checkpointing took on `model`: some module of it recomputes its activations."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def join_processes(device_name: str) -> None:
    """Under `accelerate launch` / torchrun: join the process group now (before any stage), so that barriers hold
    from the start. Nothing in one process."""
    if dist.is_distributed():
        device = resolve_device(device_name)
        if _ACCELERATOR is None:
            atexit.register(_leave_processes)
        accelerator(torch.device("cuda", dist.local_rank()) if device.type == "cuda" and device.index is None else device)


def _leave_processes() -> None:
    """At exit: leave the process group cleanly and together, with the DDP wrappers freed first. A wrapper left to
    the interpreter's teardown (the accelerator's list of prepared models held one per stage) aborted the process
    ("terminate called without an active exception") in 3 of 47 exits on a loaded 2-core machine, and in none of 80
    once they were freed here. (torch 2.13 keeps gloo's threads alive after destroy_process_group once a DDP wrapper
    has used the group, so freeing the wrappers does not stop them; as far as these runs show, the abort came from a
    wrapper destroyed during teardown.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if _ACCELERATOR is not None:
            _ACCELERATOR.free_memory()  # also runs the garbage collector
        with contextlib.suppress(Exception):  # a peer that died already: nothing left to wait for
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        gc.collect()


def gather_objects(obj) -> list:
    """Every process's `obj` (picklable; tensors on the CPU), in rank order, on every process; [obj] in one."""
    if not dist.is_distributed():
        return [obj]
    everyone: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(everyone, obj)
    return everyone


_ALONE = False  # working_alone


@contextlib.contextmanager
def working_alone():
    """Within the block this process works by itself (a stage the main process runs while the others wait:
    SL-CAI, the toxicity classifier): my_share, sum_over_processes and cat_over_processes act as in one process."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def _sharing() -> bool:
    return dist.is_distributed() and not _ALONE


def my_share(n: int) -> range:
    """This process's contiguous part of range(n) (n batches of an evaluation, say): parts differ by at most one, the
    first ranks taking the extra; range(n) in one process. Concatenated in rank order they are range(n)."""
    if not _sharing():
        return range(n)
    world, rank = dist.world_size(), dist.rank()
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each process's sums added up, key by key (a process whose share was empty may lack keys), in rank order;
    `values` itself in one process, so one process's figures are what they were without any split."""
    if not _sharing():
        return values
    total: dict[str, float] = {}
    for part in gather_objects(values):
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value
    return total


def cat_over_processes(parts: list[torch.Tensor], device) -> torch.Tensor:
    """The tensors of every process's share (my_share), concatenated in rank order on `device`: the whole, on every
    process; torch.cat(parts) in one process."""
    if not _sharing():
        return torch.cat(parts)
    everyone = gather_objects([t.cpu() for t in parts])  # pickled through the process group: CPU tensors
    return torch.cat([t for share in everyone for t in share]).to(device)


def barrier() -> None:
    """Wait for every process (nothing in one process)."""
    if dist.is_distributed():
        if not torch.distributed.is_initialized():
            raise RuntimeError("several processes but no process group: call join_processes first")
        torch.distributed.barrier()


def save_pretrained(model, tokenizer, path) -> None:
    """model.save_pretrained and tokenizer.save_pretrained into `path` by the main process only (every rank holds
    the same weights, or under sharding its shards, which are gathered first), the others waiting until it is
    written."""
    state = sharded_state_dict(model) if dist.is_distributed() else None
    if dist.is_main_process():
        if state is None:
            model.save_pretrained(path)
        else:
            model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    barrier()
