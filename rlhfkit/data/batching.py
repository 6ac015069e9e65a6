"""Tokenising prompt/completion pairs and padding them into batches.

Prompt and completion are tokenised separately and concatenated (then EOS), so the boundary between
them is exact for any tokenizer (a BPE merge across the boundary would otherwise blur which tokens the
loss applies to). Every algorithm builds its batches here.
"""

from __future__ import annotations

import torch


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]  # with the tokenizer's own special tokens (e.g. BOS)


def encode_completion(tokenizer, completion: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the left (prompts, so generation continues at the same column)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Tq) left-padded query ids and mask."""
    return pad_left([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)


def encode_pairs(tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion+EOS sequences.

    Returns input_ids (B, T), attention_mask (B, T) and completion_mask (B, T): 1 on completion tokens
    (EOS included), the tokens that SFT learns and that a reward model's last-token score follows.
    """
    seqs, comp = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
        seqs.append(p + c)
        comp.append([0] * len(p) + [1] * len(c))
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    completion_mask, _ = pad_right(comp, 0)
    return ids, mask, completion_mask


def check_representable(tokenizer, texts: list[tuple[str, str]], source: str, role: str, limit: float = 0.01) -> None:
    """Refuse text the tokenizer cannot represent: more than `limit` of its tokens are <unk>.

    `texts` are (where, text) pairs, `where` naming the record and field for the message. A word-level
    tokenizer turns any unknown word into <unk>, so English text under the digits tokenizer would train a
    model on nothing but <unk> and still report a perfect score. Byte-level tokenizers have no <unk>.
    """
    from rlhfkit.errors import DataError

    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return
    # A literal "<unk>" in the text is the policy's own sampled token (decoded as is), not unknown text.
    encoded = tokenizer([t.replace(tokenizer.unk_token, " ") for _, t in texts], add_special_tokens=False)["input_ids"]
    total = sum(len(ids) for ids in encoded)
    unknown = [sum(i == unk for i in ids) for ids in encoded]
    if total and sum(unknown) / total > limit:
        worst = max(range(len(texts)), key=lambda i: unknown[i] / max(len(encoded[i]), 1))
        where, text = texts[worst]
        raise DataError(
            f"{source}: {sum(unknown)} of {total} tokens ({sum(unknown) / total:.0%}) are {tokenizer.unk_token} under "
            f"the {role}'s tokenizer, which cannot represent this text (e.g. {where} = {text[:60]!r} gives "
            f"{unknown[worst]} of {len(encoded[worst])} unknown); use a model whose tokenizer covers it")
