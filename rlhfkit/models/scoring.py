"""Reward functions over *text*: each scorer tokenises with its own tokenizer.

Online methods decode the policy's responses and hand (prompt, completion) strings to a scorer, so a
reward model never has to share the policy's tokenizer, and several scorers can be combined
(rlhfkit/spine/reward_sources.py). A sequence-classification model reads text one of two ways:

- **decoder** (GPT-2, Llama, Qwen, ...: what rlhfkit trains from an SFT policy): prompt + completion + end of
  turn as the policy would see them (rlhfkit.data.batching.encode_example, chat template included), the
  `score` head read at the last real token (models.sequence_scores; InstructGPT's reward model).
- **native** (encoders: BERT, MiniLM, RoBERTa, DeBERTa, ...; and any classifier read by its own forward): the
  tokenizer's own pair encoding, `tokenizer(prompt, completion)` ([CLS] prompt [SEP] completion [SEP] for
  BERT), then the model's own forward (pooler and classifier), exactly how the model is used elsewhere; no
  EOS appended. An encoder has no chat template: a conversation is written as "role: content" lines.
- **text alone** (a classifier rlhfkit trained on single texts, the toxicity classifier; its config.json says so,
  TEXT_INPUT_KEY): the completion alone, no prompt, by the model's own forward.

`is_decoder_model` picks the reading of a reward model from its config; a reward model trained from an
encoder (`reward.init` = an encoder directory) is trained and scored the native way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.data.batching import encode_example, pad_id, pad_right
from rlhfkit.data.chat import has_chat_template, render
from rlhfkit.models.forward import freeze, sequence_scores
from rlhfkit.models.load import check_model_dir, load_scalar_model, load_tokenizer
from rlhfkit.models.runtime import Runtime, autocast


def is_decoder_model(path: str | Path) -> bool:
    """Whether the model in `path` is read the decoder way: its architecture has a causal-LM head in
    transformers and no masked-LM head (GPT-2, Llama, Qwen, Mistral, ...). BERT-like encoders (which also
    have a causal-LM variant, but are masked LMs), T5 and anything else are read by their own forward."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def as_text(text) -> str:
    """A prompt or completion as plain text for a tokenizer without a chat template: a string as is, one
    assistant message as its content, a conversation as "role: content" lines."""
    if isinstance(text, str):
        return text
    if len(text) == 1 and text[0].get("role") == "assistant":
        return text[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in text)


def _messages(text, role: str) -> list:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def encode_native(tokenizer, prompts: list, completions: list) -> dict[str, torch.Tensor]:
    """The model's own input for (prompt, completion) pairs, right-padded: the tokenizer's pair encoding
    (input_ids, attention_mask and, for BERT-like models, token_type_ids), truncated to the model's length
    ('longest_first'). A tokenizer with a chat template (a decoder classifier) gets the rendered conversation."""
    if has_chat_template(tokenizer):
        texts = [render(tokenizer, _messages(p, "user") + _messages(c, "assistant"), add_generation_prompt=False)
                 for p, c in zip(prompts, completions, strict=True)]
        return dict(tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, return_tensors="pt"))
    return dict(tokenizer([as_text(p) for p in prompts], [as_text(c) for c in completions], padding=True,
                          truncation=True, return_tensors="pt"))


# A classifier rlhfkit trained on texts alone (the toxicity classifier, rlhfkit/algorithms/classifier.py) records
# TEXT_INPUT_KEY = "text" in its config.json, so every scorer reads it as it was trained: the reply alone, with no
# prompt (the pair encoding would give it a prompt segment it never saw).
TEXT_INPUT_KEY = "rlhfkit_input"


def encode_texts(tokenizer, texts: list) -> dict[str, torch.Tensor]:
    """(B, T) the model's own input for single texts, right-padded, truncated to tokenizer.model_max_length."""
    return dict(tokenizer([as_text(t) for t in texts], padding=True, truncation=True, return_tensors="pt"))


def reads_text_alone(model) -> bool:
    """Whether a classifier was trained on texts alone (TEXT_INPUT_KEY), so it reads the completion alone."""
    return getattr(model.config, TEXT_INPUT_KEY, "") == "text"


def encode_for_scoring(tokenizer, prompts: list, completions: list, decoder: bool) -> dict[str, torch.Tensor]:
    """(B, T) model inputs of (prompt, completion) pairs, the decoder way (prompt + completion + end of turn,
    right-padded) or the native way (encode_native)."""
    if not decoder:
        return encode_native(tokenizer, prompts, completions)
    seqs = [encode_example(tokenizer, p, c)[0] for p, c in zip(prompts, completions, strict=True)]
    ids, mask = pad_right(seqs, pad_id(tokenizer))
    return {"input_ids": ids, "attention_mask": mask}


def sequence_logits(model, batch: dict[str, torch.Tensor], decoder: bool, rt: Runtime | None = None) -> torch.Tensor:
    """(B, C) float32 logits of a sequence classifier: the decoder way, the head at the last real token
    (C = 1: a reward model; with rt.padding_free the rows packed, sequence_scores); the native way, the model's own
    forward (an encoder attends both ways: its rows stay padded)."""
    if decoder:
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"], rt).unsqueeze(-1)
    return model(**batch).logits.float()


def sequence_rewards(model, batch: dict[str, torch.Tensor], decoder: bool, rt: Runtime | None = None) -> torch.Tensor:
    """(B,) the scalar of a one-label model (a reward model), read either way."""
    return sequence_logits(model, batch, decoder, rt)[:, 0]


class ClassifierScorer:
    """A sequence-classification model directory as a function of text: its (B, C) logits, in batches, on
    the run's device. `decoder` None = decided by the model's config (is_decoder_model)."""

    def __init__(self, path: str | Path, rt: Runtime, role: str, *, num_labels: int | None = None,
                 decoder: bool | None = None, batch_size: int = 512):
        check_model_dir(path, role, causal=False)
        self.decoder = is_decoder_model(path) if decoder is None else decoder
        self.tokenizer = load_tokenizer(path, role, require_eos=self.decoder)
        self.model = freeze(load_scalar_model(path, rt.device, role, num_labels=num_labels, trained_head=True))
        if not self.decoder and self.model.config.pad_token_id is None:  # a decoder read by its own forward
            self.model.config.pad_token_id = pad_id(self.tokenizer)  # finds its last token by the pad id
        self.rt, self.batch_size, self.path, self.role = rt, batch_size, Path(path), role
        self.positions = getattr(self.model.config, "max_position_embeddings", None)
        self.text_alone = not self.decoder and reads_text_alone(self.model)

    @torch.no_grad()
    def logits(self, prompts: list, completions: list) -> torch.Tensor:
        """(B, C) float32 logits (of the completions alone for a classifier trained on texts alone)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            if self.text_alone:
                batch = encode_texts(self.tokenizer, completions[start:end])
            else:
                batch = encode_for_scoring(self.tokenizer, prompts[start:end], completions[start:end], self.decoder)
            if self.decoder and self.positions and batch["input_ids"].shape[1] > self.positions:
                raise RlhfkitError(  # not an IndexError from the position embedding
                    f"{self.role} {self.path} has {self.positions} positions, but a prompt + reply + EOS to score "
                    f"takes {batch['input_ids'].shape[1]}: lower data.max_new_tokens or data.max_prompt_length")
            batch = {k: v.to(self.rt.device) for k, v in batch.items()}
            with autocast(self.rt.device, self.rt.dtype):
                out.append(sequence_logits(self.model, batch, self.decoder, self.rt).float())
        return torch.cat(out)


class RewardModelScorer(ClassifierScorer):
    """A reward model directory (one label): score = its scalar, read the way the model reads text (decoder:
    at the last token of prompt + completion + EOS; an encoder: its own forward on the pair)."""

    def __init__(self, path: str | Path, rt: Runtime, batch_size: int = 512, decoder: bool | None = None):
        super().__init__(path, rt, "reward model", num_labels=1, decoder=decoder, batch_size=batch_size)

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        """(B,) float32 scores on the run's device."""
        return self.logits(prompts, completions)[:, 0]


class ClassLabelScorer(ClassifierScorer):
    """A classifier reward: the logit, or the probability, of one named class (e.g. 'not toxic') of any
    sequence classifier, read by its own forward (on the (prompt, completion) pair, or the completion alone for a
    classifier trained on texts alone: TEXT_INPUT_KEY). Probability: softmax over the classes, or the sigmoid of a
    single-logit (binary) classifier's logit."""

    def __init__(self, path: str | Path, rt: Runtime, label: str, output: str = "logit", batch_size: int = 512):
        super().__init__(path, rt, "classifier", decoder=False, batch_size=batch_size)
        self.index, self.output = class_index(self.model.config.id2label, label, self.path), output

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        logits = self.logits(prompts, completions)  # (B, C)
        if self.output == "logit":
            return logits[:, self.index]
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)
        return probs[:, self.index]


def class_index(id2label: dict, label: str, path: Path) -> int:
    """The index of `label` among a classifier's classes: a name of its id2label (case-insensitive), or an index."""
    names = {int(i): str(n) for i, n in id2label.items()}
    found = [i for i, n in names.items() if n.lower() == label.lower()]
    if found:
        return found[0]
    if label.isdigit() and int(label) in names:
        return int(label)
    listed = ", ".join(f"{i} = {n!r}" for i, n in sorted(names.items()))
    raise RlhfkitError(f"classifier {path}: no class {label!r}; its classes are {listed}: set the source's label to "
                       "one of these names (or indices)")
