"""`rlhfkit model from-gguf`: a GGUF file (what llama.cpp and Ollama hold) as a plain Hugging Face model directory.

transformers reads a GGUF file with the `gguf` package: the config and the tokenizer are rebuilt from the file's
metadata, the weights dequantized. A model loaded that way carries transformers' GGUF quantizer, and save_pretrained
may refuse it ("quantized with gguf and is not serializable"), so its weights are copied into a plain model built
from the same config, which saves like any local model: model.safetensors, config.json, generation_config.json, the tokenizer's files and the chat template the GGUF
carries (`tokenizer.chat_template`). rlhfkit's loaders (rlhfkit.models.load) then read the directory like any other.

Everything is checked before anything heavy is loaded, each failure an RlhfkitError naming the file and what to do:
no such file, not a GGUF, the `gguf` package missing, an architecture or a quantisation type transformers cannot
load from GGUF, no tokenizer in the metadata, OUT_DIR already there. The directory is written as OUT_DIR.tmp and
renamed at the end: complete or absent, never half written. At the peak two float32 copies of the model are in
memory (the loaded one and the plain one): about 1.5 GB for SmolLM2-135M.

transformers and gguf are imported inside the functions (heavy, optional: the `gguf` extra).

Layer: models (imports core; within models: load).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.load import quiet_transformers

GGUF_MAGIC = b"GGUF"  # a GGUF file's first four bytes (the format's spec, ggml docs/gguf.md)
INSTALL_HINT = "pip install 'rlhfkit[gguf]' (or: bash scripts/setup.sh gguf)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Not architectures: transformers' table of GGUF metadata keys also holds these two key prefixes.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _canonical(arch: str) -> str:
    """GGUF files and transformers spell some names differently (qwen2moe / qwen2_moe, gpt-oss / gpt_oss)."""
    return arch.replace("-", "").replace("_", "")


def supported_architectures() -> list[str]:
    """The `general.architecture` values transformers can load from a GGUF file, in the installed version."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES
    try:  # transformers >= 5.x: a second reader for newer architectures
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        archs |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(archs)


def supported_tensor_types() -> list[str]:
    """The ggml tensor types (F32, F16, Q8_0, Q4_K, ...) the `gguf` package can dequantize: each is tried on one
    block of zeros, so the list is the installed package's own."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    names = []
    for qtype in GGMLQuantizationType:
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        try:
            dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        names.append(qtype.name)
    return names


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def read_gguf(path: str | Path) -> dict:
    """What the checks need from a GGUF file's header: architecture, tensor types (name -> count), whether it holds
    a tokenizer and a chat template. Raises an RlhfkitError for a missing, non-GGUF or unreadable file and when
    the `gguf` package is missing."""
    path = Path(path)
    if not path.is_file():
        raise RlhfkitError(f"{path}: no such file; give the path of a .gguf model file (llama.cpp, Ollama)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RlhfkitError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); give a .gguf "
                           "model file as written by llama.cpp or Ollama")
    try:
        import accelerate  # noqa: F401  (transformers needs it to load a GGUF file)
        from gguf import GGUFReader
    except ImportError as e:
        raise RlhfkitError(f"reading {path} needs the `{e.name or 'gguf'}` package: {INSTALL_HINT}") from None
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError) as e:  # truncated, or a newer GGUF than the package knows
        raise RlhfkitError(f"{path}: cannot read this GGUF file ({_one_line(e)}); is it complete? If it is a newer "
                           "GGUF, upgrade the reader: pip install -U gguf") from None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"architecture": _string_field(reader, "general.architecture"),
            "name": _string_field(reader, "general.name"),
            "tensor_types": types,
            "tokenizer": _string_field(reader, "tokenizer.ggml.model"),
            "chat_template": _string_field(reader, "tokenizer.chat_template")}


def check_gguf(path: str | Path) -> dict:
    """read_gguf, then refuse what transformers cannot load: an architecture it has no GGUF reader for, a tensor
    type the `gguf` package cannot dequantize, a file without a tokenizer."""
    info = read_gguf(path)
    arch = info["architecture"]
    supported = supported_architectures()
    if arch is None:
        raise RlhfkitError(f"{path} has no general.architecture in its metadata; it is not a model GGUF file")
    if _canonical(arch) not in {_canonical(a) for a in supported}:
        raise RlhfkitError(f"{path} holds a {arch!r} model, which transformers cannot load from GGUF; it loads these "
                           f"architectures: {', '.join(supported)}. Use the model's Hugging Face directory instead, "
                           "or a newer transformers")
    known = set(supported_tensor_types())
    unknown = sorted(set(info["tensor_types"]) - known)
    if unknown:
        raise RlhfkitError(f"{path} stores tensors as {', '.join(unknown)}, which the gguf package cannot dequantize; "
                           f"it reads {', '.join(sorted(known))}. Get a file of this model quantised to one of these "
                           "(Q8_0, Q4_K_M, F16, ... are common), or upgrade it: pip install -U gguf")
    if info["tokenizer"] is None:
        raise RlhfkitError(f"{path} holds no tokenizer (no tokenizer.ggml.model in its metadata); rlhfkit needs the "
                           "model's tokenizer: use a GGUF file that carries one, or the model's Hugging Face directory")
    return info


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """Write the model in `gguf_path` as a plain Hugging Face directory `out_dir` (weights in `dtype`, its tokenizer
    and chat template). Returns {"out_dir", "parameters", "architecture", "tensor_types", "chat_template"}."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise RlhfkitError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out_dir.exists():
        raise RlhfkitError(f"{out_dir} exists; convert into a new directory (or delete it first)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        raise RlhfkitError(f"{tmp} exists (left by an interrupted conversion?); delete it and run again")
    info = check_gguf(gguf_path)

    # 1. The tokenizer, with the chat template the GGUF carries.
    tokenizer = load_gguf_tokenizer(gguf_path)
    if info["chat_template"] and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = info["chat_template"]

    # 2. The model, dequantized, and its weights moved into a plain (serialisable) model of the same config.
    from transformers import AutoModelForCausalLM

    model = load_gguf_model(gguf_path)
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the plain model is not quantized: no loader may look for a GGUF
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())  # strict: every weight accounted for
    plain.generation_config = model.generation_config
    del model
    plain = plain.to(DTYPES[dtype]).eval()
    parameters = sum(p.numel() for p in plain.parameters())

    # 3. Written as OUT_DIR.tmp, renamed when complete; removed on any failure (or Ctrl-C) before that.
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise RlhfkitError(f"cannot write {out_dir} ({_one_line(e)}); nothing was left behind") from None
        raise
    return {"out_dir": out_dir, "parameters": parameters, "architecture": info["architecture"],
            "tensor_types": info["tensor_types"], "chat_template": bool(info["chat_template"])}


def load_gguf_model(gguf_path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM by transformers' own GGUF loading, its weights dequantized into `dtype`."""
    import transformers
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    quiet_transformers()
    # transformers >= 5.x may keep the weights in their GGUF blocks (when the `kernels` package has a matmul for
    # them); dequantize=True asks for a plain dense model. Older versions always dequantize.
    extra = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    try:
        return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise RlhfkitError(f"transformers cannot load the model in {gguf_path} ({_one_line(e)})") from None


def load_gguf_tokenizer(gguf_path: str | Path):
    """The tokenizer transformers rebuilds from a GGUF file's `tokenizer.ggml.*` metadata."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise RlhfkitError(f"transformers cannot build the tokenizer of {gguf_path} ({_one_line(e)})") from None
