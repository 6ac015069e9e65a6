import pytest

from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.tasks import get_task


@pytest.fixture(scope="session")
def digits():
    return get_task("digits")


@pytest.fixture(scope="session")
def tokenizer(digits):
    return digits.build_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_policy_dir(request, tmp_path, tokenizer):
    """A tiny random causal LM of each architecture, saved with save_pretrained like a user's model."""
    model = build_tiny_policy(TinyModelSpec(request.param, 2, 32, 4, 32), tokenizer, seed=0)
    path = tmp_path / request.param
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sharpen(model, std=0.3, seed=1):
    """`model` with every weight matrix redrawn at `std`, in eval mode (sharp_policy says why)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="session")
def sharp_policy(tokenizer):
    """make(arch, std=0.3, seed=1): a tiny model with every weight matrix redrawn at `std`, so next-token logits
    have std ~2 and a shifted position or an extra token changes a log-prob by far more than rounding (at the
    default init every distribution is nearly uniform and such bugs hide)."""

    def make(arch, std=0.3, seed=1):
        return sharpen(build_tiny_policy(TinyModelSpec(arch, 2, 32, 4, 32), tokenizer, seed=0), std, seed)

    return make


@pytest.fixture(scope="session")
def rollout_batch(tokenizer):
    """make(n=7, seed=4) -> (queries, query_mask, responses, response_mask): left-padded queries and right-padded
    responses of varied lengths of digits tokens, as the sampler returns them."""
    import random

    from rlhfkit.data.batching import pad_left, pad_right

    def make(n=7, seed=4):
        rng = random.Random(seed)
        words = [str(d) for d in range(10)]
        queries = [tokenizer(" ".join(rng.choices(words, k=rng.randrange(1, 6))))["input_ids"] for _ in range(n)]
        responses = [tokenizer(" ".join(rng.choices(words, k=rng.randrange(1, 9))), add_special_tokens=False)
                     ["input_ids"] for _ in range(n)]
        return (*pad_left(queries, 0), *pad_right(responses, 0))

    return make


@pytest.fixture(scope="session")
def sharp_scalar():
    """make(policy, std=0.3, seed=2): a sequence classifier (a reward or value model) of the policy's shape and
    architecture, its weights redrawn like sharp_policy's."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    def make(policy, std=0.3, seed=2):
        config = {**policy.config.to_dict(), "id2label": {0: "score"}, "pad_token_id": 0}
        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(GPT2Config(**config)) if policy.config.model_type == "gpt2" else \
            LlamaForSequenceClassification(LlamaConfig(**config))
        return sharpen(model, std, seed)

    return make


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A byte-level BPE tokenizer built locally, Llama/Qwen style (benchmarks/user_data.py): BOS added by its
    post-processor, a ChatML chat template that writes BOS too, <|im_end|> as end of turn, no pad token."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("user_data", Path(__file__).resolve().parents[1] / "benchmarks" / "user_data.py")
    user_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_data)
    corpus = ["the quick brown fox jumps over the lazy dog", "user assistant system hello world 0 1 2 3 4 5 6 7 8 9",
              "Human: what is two plus two? Assistant: four."] * 20
    return user_data.build_chat_tokenizer(corpus)
