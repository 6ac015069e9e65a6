"""The offline trainers keep their data in host memory and move each batch to the run's device (Runtime.put), as a
DataLoader does (issue 17: "distributed samplers instead of whole datasets on the device").

On this CPU-only machine the host and the device are the same memory, so a forgotten move would pass every other
test and fail only on a GPU ("Expected all tensors to be on the same device"). Here every trainer runs on a stand-in
device instead: the encoders' tensors are tagged as host data (HostTensor), Runtime.put re-tags what it moves
(OnDevice), the tags follow every torch operation (tensor subclasses), and a torch function mode fails any
operation that would fail on a GPU:
- a host tensor of one or more dimensions meeting a device tensor (a 0-d host tensor is allowed: CUDA takes a
  CPU scalar tensor too), e.g. the reward model's margins or KTO's labels against the model's scores;
- a host tensor given to an embedding (token ids, or position ids from an unmoved attention mask).
Tensors neither tagged (indices, parameters, tensors made on the device) are neutral, as indices on the host are
on a GPU: indexing host data with them, or a device tensor, works there too."""

import dataclasses
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from rlhfkit.algorithms import dpo as dpo_module
from rlhfkit.algorithms import kto as kto_module
from rlhfkit.algorithms import reward as reward_module
from rlhfkit.algorithms import sft as sft_module
from rlhfkit.models.runtime import Runtime
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import run_stage


class HostTensor(torch.Tensor):
    """A tensor of a dataset, in host memory."""


class OnDevice(torch.Tensor):
    """A tensor Runtime.put moved to the device, and everything computed from it."""


class StandInDevice(TorchFunctionMode):
    """Fails an operation that mixes host data with device tensors, or feeds host data to an embedding."""

    def __init__(self):
        super().__init__()
        self.moved = 0  # batches' tensors moved: the trainers really went through Runtime.put

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):  # where the indexed tensor is decides
            return self._index(func, args)
        host = [t for t in tensors if type(t) is HostTensor and t.dim() > 0]
        if host:
            if any(isinstance(t, OnDevice) for t in tensors):
                raise AssertionError(f"{getattr(func, '__name__', func)}: host data {tuple(host[0].shape)} meets a "
                                     "device tensor (on a GPU: tensors on different devices); move it with Runtime.put")
            if func is torch.nn.functional.embedding:
                raise AssertionError(f"a model reads host data {tuple(host[0].shape)}: move it with Runtime.put")
        with torch._C.DisableTorchFunctionSubclass():  # computed untagged, then tagged as its inputs were
            result = func(*args, **kwargs)
        tag = OnDevice if any(isinstance(t, OnDevice) for t in tensors) else \
            HostTensor if any(type(t) is HostTensor for t in tensors) else None
        return result if tag is None else tree_map(
            lambda r: r.as_subclass(tag) if type(r) is torch.Tensor else r, result)

    @staticmethod
    def _index(func, args):
        """t[index] (= value): on a GPU, device data takes host indices, host data no device ones; a value set
        must be where t is."""
        target, index, *value = args
        if type(target) is HostTensor and any(isinstance(t, OnDevice) for t in tree_leaves(index)):
            raise AssertionError(f"host data {tuple(target.shape)} indexed by a device tensor")
        if value and isinstance(value[0], torch.Tensor) and value[0].dim() > 0 and \
                {type(target), type(value[0])} == {HostTensor, OnDevice}:
            raise AssertionError(f"a {type(value[0]).__name__} value set into a {type(target).__name__}")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args)
        tag = type(target) if type(target) in (HostTensor, OnDevice) else None
        return result.as_subclass(tag) if tag is not None and type(result) is torch.Tensor else result


def as_host(value):
    """`value` (tensors in tuples, lists, dicts, named tuples, dataclasses) with every tensor tagged as host data."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(HostTensor)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: as_host(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*map(as_host, value))
    if isinstance(value, (tuple, list)):
        return type(value)(map(as_host, value))
    if isinstance(value, dict):
        return {k: as_host(v) for k, v in value.items()}
    return value


ENCODERS = [(sft_module, "encode_pairs"), (reward_module, "encode_comparisons"),
            (reward_module, "encode_ranked_items"), (dpo_module, "encode_dpo_pairs"),
            (dpo_module, "encode_ranked_items"), (kto_module, "encode_thumbs")]


@pytest.fixture
def stand_in(monkeypatch):
    """Within the test: the trainers' data tagged as host data, Runtime.put moving to the stand-in device."""
    mode = StandInDevice()
    for module, name in ENCODERS:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: as_host(_real(*a, **k)))

    def put(self, t):
        mode.moved += 1
        return t.as_subclass(OnDevice)

    monkeypatch.setattr(Runtime, "put", put)
    return mode


def test_the_stand_in_device_fails_what_a_gpu_would():
    host, device = torch.ones(3).as_subclass(HostTensor), torch.ones(3).as_subclass(OnDevice)
    with StandInDevice():
        assert type(device * host.sum()) is OnDevice  # a 0-d host tensor: allowed, as on CUDA
        assert type(host[torch.tensor([0, 2])]) is HostTensor  # host data indexed on the host
        assert type(device[torch.tensor([0, 2]).as_subclass(HostTensor)]) is OnDevice  # device data, host indices
        with pytest.raises(AssertionError, match="indexed by a device tensor"):
            host[torch.tensor([0, 2]).as_subclass(OnDevice)]
        with pytest.raises(AssertionError, match="meets a device tensor"):
            device * host
        with pytest.raises(AssertionError, match="model reads host data"):
            torch.nn.Embedding(4, 2)(torch.tensor([1, 2]).as_subclass(HostTensor))
        torch.nn.Embedding(4, 2)(torch.tensor([1, 2]).as_subclass(OnDevice))


MICRO = ["sft.n_demos=320", "sft.epochs=1", "sft.batch_size=32", "feedback.n_prompts=48", "device='cpu'", "threads=1",
         "reward.epochs=1", "reward.batch_size=16", "dpo.epochs=1", "dpo.batch_size=16", "simpo.epochs=1",
         "simpo.batch_size=16", "kto.epochs=1", "kto.batch_size=16", "eval.n_prompts=8"]


def test_every_offline_trainer_moves_its_batches_to_the_device(tmp_path, stand_in):
    """SFT (padded and packed), the reward model (pairs; rankings; both packed; prefixes shared), DPO (cached and
    online reference, pairs and rankings, packed, prefixes shared), SimPO and KTO (one micro-batch and two: its z0 path) on the stand-in device: every
    batch they use reaches the model and the losses from the device, never from host memory."""
    out = tmp_path / "out"
    cfg = load_config(overrides=MICRO)
    with stand_in:
        run_stage("sft", cfg, out)
        run_stage("sft", load_config(overrides=MICRO + ["train.padding_free=true"]), tmp_path / "packed")
    assert stand_in.moved > 0
    run_stage("feedback", cfg, out)  # sampling and simulated labels: no dataset of the trainers' kind
    thumbs = tmp_path / "thumbs"
    shutil.copytree(out, thumbs)
    kto_cfg = load_config(overrides=MICRO + ["method='kto'", "feedback.kind='thumbs'"])
    run_stage("feedback", kto_cfg, thumbs)
    runs = [
        ("reward", MICRO, out),
        ("reward", MICRO + ["reward.loss='plackett_luce'"], out),
        ("reward", MICRO + ["train.padding_free=true"], out),
        ("reward", MICRO + ["reward.loss='plackett_luce'", "train.padding_free=true"], out),
        ("dpo", MICRO, out),
        ("dpo", MICRO + ["dpo.reference='online'", "train.gradient_accumulation_steps=2"], out),
        ("dpo", MICRO + ["dpo.loss='plackett_luce'"], out),
        ("dpo", MICRO + ["train.padding_free=true"], out),
        ("reward", MICRO + ["train.shared_prefix=true"], out),
        ("dpo", MICRO + ["train.shared_prefix=true", "dpo.reference='online'"], out),
        ("simpo", MICRO + ["method='simpo'"], out),
        ("kto", MICRO + ["method='kto'", "feedback.kind='thumbs'"], thumbs),
        ("kto", MICRO + ["method='kto'", "feedback.kind='thumbs'", "kto.reference='online'",
                         "train.gradient_accumulation_steps=2"], thumbs),
    ]
    for stage, overrides, where in runs:
        before = stand_in.moved
        with stand_in:
            result = run_stage(stage, load_config(overrides=overrides), where)
        assert stand_in.moved > before, (stage, overrides)
        assert result["steps"] > 0, (stage, overrides)
