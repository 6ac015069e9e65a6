import pytest

from rlhfkit.models import TinyModelSpec, build_tiny_policy
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
