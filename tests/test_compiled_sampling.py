"""`[sampling] compile`: the decoding step under torch.compile over a static KV cache (rlhfkit.models.sampling,
compiled_step). On CPU it runs through inductor, the path CUDA graphs wrap on a GPU; each step's probabilities
must be the eager sampler's to float rounding (the static cache attends over all its positions, the unfilled ones
masked), on ragged left-padded prompts, for GPT-2 (learned positions) and Llama (rotary)."""

import pytest
import torch
import torch._dynamo

import rlhfkit.models.sampling as sampling
from rlhfkit.core.errors import RlhfkitError
from rlhfkit.data.batching import pad_left
from rlhfkit.models.sampling import SamplingParams, sample

QUERIES = [[3, 4, 5, 6, 7], [8, 9], [5, 5, 5, 5, 5, 5, 5, 5], [4]]  # digits ids, ragged: left padding in play


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs: none compiled by an earlier test (torch's on-disk cache keeps it quick)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def probs_and_samples(model, tokenizer, queries, mask, params, monkeypatch, new_tokens=12):
    """sample() at a fixed seed, and the (B, V) probabilities of each step's draw."""
    seen = []
    draw = sampling.draw_tokens

    def recording(probs, generator, how):
        seen.append(probs.clone())
        return draw(probs, generator, how)

    monkeypatch.setattr(sampling, "draw_tokens", recording)
    s = sample(model, queries, mask, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3), sampling=params)
    monkeypatch.setattr(sampling, "draw_tokens", draw)
    return s, seen


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_compiled_sampler_draws_from_the_eager_samplers_probabilities(arch, tokenizer, sharp_policy, monkeypatch,
                                                                         capsys):
    """Every step's probabilities equal the eager sampler's to 1e-5 (sharp weights: a wrong position, a padding
    column or an unfilled cache position attended to moves them by far more), so the samples are the same; a
    batch of other prompt lengths in the same cache size reuses the compiled graph, another batch size compiles
    one more."""
    model = sharp_policy(arch)
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    eager, eager_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(), monkeypatch)
    before = graphs()
    fast, fast_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(compile=True), monkeypatch)
    assert graphs() == before + 1
    assert "sampling.compile: 4 rows x 64 positions" in capsys.readouterr().err  # a compile is announced
    assert len(fast_probs) == len(eager_probs) > 5
    for a, b in zip(fast_probs, eager_probs):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert torch.equal(fast.responses, eager.responses) and torch.equal(fast.response_mask, eager.response_mask)
    assert torch.equal(fast.ended, eager.ended)
    again, _ = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(compile=True), monkeypatch)
    assert torch.equal(again.responses, fast.responses)  # same seed, same samples (the kept cache reset between)

    shorter, shorter_mask = pad_left(QUERIES[:2] + [[7, 7, 7], [6, 5]], tokenizer.pad_token_id)  # 5 columns, not 8
    eager, eager_probs = probs_and_samples(model, tokenizer, shorter, shorter_mask, SamplingParams(), monkeypatch)
    fast, fast_probs = probs_and_samples(model, tokenizer, shorter, shorter_mask, SamplingParams(compile=True),
                                         monkeypatch)
    assert graphs() == before + 1  # the same static cache size (64 positions) and batch size: no new graph
    kept = sampling._STATIC_CACHES[model][1]  # ... and the same cache, reset (CUDA graphs replay on its addresses)
    assert sampling.static_cache(model, 4, 64, torch.device("cpu")) is kept
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fast_probs, eager_probs))
    assert torch.equal(fast.responses, eager.responses)

    probs_and_samples(model, tokenizer, queries[:2], mask[:2], SamplingParams(compile=True), monkeypatch)
    assert graphs() == before + 2  # another batch size: its own graph

    with torch.no_grad():  # an optimiser step between two samples: the compiled step reads the weights as they are
        for p in model.parameters():
            p.mul_(1.3)
    eager, eager_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(), monkeypatch)
    fast, fast_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(compile=True), monkeypatch)
    assert graphs() == before + 2
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fast_probs, eager_probs))


def test_a_pipelines_many_graphs_stay_compiled():
    """A run samples from several models at several batch sizes, each its own graph of one function: the
    recompile limit is raised so that the later ones are not run eagerly."""
    sampling.compiled_step.cache_clear()
    sampling.compiled_step("cpu")
    assert torch._dynamo.config.recompile_limit >= 64


def test_the_config_switches_it_on_for_every_stage_that_samples():
    from rlhfkit.pipeline.config import load_config

    assert SamplingParams.of(load_config().sampling).compile is False
    assert SamplingParams.of(load_config(overrides=["sampling.compile=true"]).sampling).compile is True


def test_compiled_sampling_refuses_a_model_it_cannot_cache_statically(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    with pytest.raises(RlhfkitError, match="sampling.compile needs a model whose layers are all full attention"):
        sample(MistralForCausalLM(config).eval(), queries, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=0,
               sampling=SamplingParams(compile=True))


def test_a_lora_policy_samples_with_its_adapter_on_and_off(tokenizer, sharp_policy, monkeypatch, tmp_path):
    """Through peft: the adapter's weights count, and switching it off (the reference of a LoRA run) takes
    another graph rather than replaying the adapted one."""
    from rlhfkit.models.lora import wrap_lora
    from rlhfkit.pipeline.config import LoRAConfig

    model = wrap_lora(sharp_policy("gpt2"), LoRAConfig(r=4), tmp_path, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (the adapter a no-op); give it a say
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    runs = {}
    for off in (False, True):
        for compiled in (False, True):
            with model.disable_adapter() if off else torch.no_grad():
                runs[off, compiled] = probs_and_samples(model, tokenizer, queries, mask,
                                                        SamplingParams(compile=compiled), monkeypatch)[1]
    for off in (False, True):
        assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(runs[off, True], runs[off, False]))
    assert not torch.allclose(runs[True, True][0], runs[False, True][0], atol=1e-3)  # the adapter mattered


def test_a_compile_that_fails_inside_torch_says_what_to_do(tokenizer, sharp_policy, monkeypatch):
    class BackendCompilerFailed(Exception):  # stands for torch._dynamo's (no C++ compiler, an unsupported op)
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"

    def failing(device_type):
        def step(*args):
            raise BackendCompilerFailed("backend='inductor' raised: CppCompileError: no C++ compiler")
        return step

    monkeypatch.setattr(sampling, "compiled_step", failing)
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    with pytest.raises(RlhfkitError, match="set sampling.compile = false"):
        sample(sharp_policy("gpt2"), queries, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=0,
               sampling=SamplingParams(compile=True))


def test_a_sample_in_another_precision_gets_a_cache_of_its_own(tokenizer, sharp_policy, monkeypatch):
    """The kept cache is reused only at the same precision: after a bf16-autocast sample (bf16 buffers) a plain
    fp32 sample of the same shape must not write its keys into them."""
    model = sharp_policy("gpt2")
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    with torch.autocast("cpu", torch.bfloat16):
        probs_and_samples(model, tokenizer, queries, mask, SamplingParams(compile=True), monkeypatch)
    bf16_cache = sampling._STATIC_CACHES[model][1]
    _, eager_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(), monkeypatch)
    _, fast_probs = probs_and_samples(model, tokenizer, queries, mask, SamplingParams(compile=True), monkeypatch)
    assert sampling._STATIC_CACHES[model][1] is not bf16_cache
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fast_probs, eager_probs))
