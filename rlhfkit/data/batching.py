"""Tokenising prompt/completion pairs and padding them into batches.

Prompt and completion are tokenised separately and concatenated (then the end of the turn), so the
boundary between them is exact for any tokenizer (a BPE merge across the boundary would otherwise blur
which tokens the loss applies to). Every algorithm builds its batches here.

Chat templates (rlhfkit.data.chat): when the tokenizer has one, a prompt (a string, taken as one user
message, or a conversation: a list of {"role", "content"} messages) is rendered with the template and the
assistant's turn opened, and tokenised once without adding special tokens (the template writes BOS itself: no
double BOS); a completion ends with the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) instead
of EOS, exactly where the sampler stops (`stop_ids`: EOS and that token). A completion of several messages
(an SFT conversation) is encoded by rlhfkit.data.chat.encode_chat, loss on its assistant turns only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from rlhfkit.core.errors import DataError
from rlhfkit.data.chat import encode_chat, encode_chat_prompt, end_of_turn_ids, has_chat_template

_stop_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # rendering a template is slow


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a sampled response: EOS and the chat template's end-of-turn token (computed once
    per tokenizer)."""
    if tokenizer not in _stop_cache:
        _stop_cache[tokenizer] = end_of_turn_ids(tokenizer)
    return _stop_cache[tokenizer]


def turn_end_id(tokenizer) -> int:
    """The id a completion ends with: the chat template's end-of-turn token when it has one, else EOS."""
    return stop_ids(tokenizer)[-1]


def _as_messages(prompt) -> list:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids: through the chat template when the tokenizer has one, else with the tokenizer's own
    special tokens (e.g. BOS). A conversation prompt needs a chat template."""
    if has_chat_template(tokenizer):
        return encode_chat_prompt(tokenizer, _as_messages(prompt))
    if isinstance(prompt, list):
        raise DataError("a conversation prompt (a list of messages) needs a tokenizer with a chat template, and "
                        f"this {type(tokenizer).__name__} has none; set tokenizer.chat_template and save it, or use "
                        "plain-text prompts")
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, completion: str, add_eos: bool = True) -> list[int]:
    """Completion ids, then (add_eos) the end of the turn: EOS, or the chat template's end-of-turn token."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [turn_end_id(tokenizer)] if add_eos else ids


def encode_example(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(ids, completion mask) of one prompt + completion. A completion given as messages goes through the
    chat template turn by turn (loss on its assistant turns), cut after its last learned token so the
    sequence ends where a sampled response would; one assistant message is its content, like a string."""
    if isinstance(completion, list) and len(completion) == 1 and completion[0].get("role") == "assistant":
        completion = completion[0]["content"]
    if isinstance(completion, list):
        ids, mask = encode_chat(tokenizer, _as_messages(prompt), completion, stop_ids(tokenizer))
        last = max(i for i, m in enumerate(mask) if m) + 1 if any(mask) else len(ids)
        return ids[:last], mask[:last]
    p, c = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
    return p + c, [0] * len(p) + [1] * len(c)


def pad_id(tokenizer) -> int:
    """The id padding is written with: the pad token, or EOS for a tokenizer without one (padding is always
    masked out, so any id works; many causal LMs ship without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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


def used_columns(mask: torch.Tensor) -> int:
    """How many leading columns of a batch's (B, T) attention mask hold any real token. A batch cut from a dataset
    padded to its longest sequence is then cut to its own longest, as a DataLoader's collator pads it (TRL's too):
    the columns past it are padding in every row, which no real token attends to (masked out, and after it in a
    causal model) and no loss reads, so the model need not compute them. On a dataset whose lengths vary (HH,
    UltraFeedback) that is most of a step; on one of equal lengths (digits) it is nothing. Left-padded batches
    keep every column."""
    used = mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 0


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequences of `lengths` placed whole into rows of `capacity` tokens, first-fit decreasing (longest first, each
    into the first row with room): the sequences of each row, in the order placed. Every sequence appears once."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            if lengths[i] > capacity:
                raise ValueError(f"a sequence of {lengths[i]} tokens does not fit rows of {capacity}")
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass(frozen=True)
class Packing:
    """Where each real token of a padded (B, T) batch goes when its sequences are packed padding-free (TRL's
    `padding_free`, without flash attention's variable-length kernels): (R, W) rows, W the batch's longest sequence,
    each holding whole sequences back to back (pack: first-fit decreasing), their real tokens in order, position ids
    restarting at 0 with each sequence. Any padding side, and any mask: a padded forward with an attention mask sees
    only a row's real tokens, at positions that count only them (rlhfkit.models.forward.position_ids), which is
    what the packed row holds. A model given position ids and no attention mask keeps attention within each
    sequence (transformers reads the bounds from the position ids); a row's unused tail gets positions 0, 1, ... of
    its own, a sequence no real token sees."""

    shape: tuple[int, int]  # (B, T): the padded batch
    packed_shape: tuple[int, int]  # (R, W)
    src: tuple[torch.Tensor, torch.Tensor]  # (N,) row and column of each real token in the padded batch
    dst: tuple[torch.Tensor, torch.Tensor]  # (N,) its row and column in the packed rows
    positions: torch.Tensor  # (R, W) position ids
    owner: torch.Tensor  # (R, W) the padded row each packed token came from, -1 on the tails
    # (R, W, W) bool, which packed token (column) each token (row) attends to: set by shared_prefix_packing, whose
    # rows hold trees, not sequences; None where position ids say it all (whole sequences back to back)
    attend: torch.Tensor | None = None

    def pack(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(B, T, ...) -> (R, W, ...): the real tokens' entries packed, `fill` on the tails."""
        out = x.new_full(self.packed_shape + tuple(x.shape[2:]), fill)
        out[self.dst] = x[self.src]
        return out

    def unpack(self, y: torch.Tensor, fill=0) -> torch.Tensor:
        """(R, W, ...) -> (B, T, ...): each real token's entry back in its padded place, `fill` on the padding
        (differentiable: y's gradient flows back through it)."""
        out = y.new_full(self.shape + tuple(y.shape[2:]), fill)
        out[self.src] = y[self.dst]
        return out

    def flat_index(self) -> torch.Tensor:
        """(B, T) each real token's place in the packed rows flattened (row x W + column), -1 on padding."""
        out = torch.full(self.shape, -1, dtype=torch.long, device=self.dst[0].device)
        out[self.src] = self.dst[0] * self.packed_shape[1] + self.dst[1]
        return out


def packing(mask: torch.Tensor, width: int | None = None) -> Packing:
    """The Packing of a batch whose real tokens are mask's 1s (on mask's device; one host sync for the lengths), in
    rows of `width` tokens (default: the longest sequence's)."""
    lengths = mask.sum(dim=1).tolist()
    width = int(max(lengths)) if width is None else width
    groups = pack(lengths, width)
    row_of, start_of = [0] * len(lengths), [0] * len(lengths)  # each sequence's packed row and first column
    positions, owner = torch.zeros(len(groups), width, dtype=torch.long), torch.full((len(groups), width), -1)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            row_of[i], start_of[i] = r, at
            positions[r, at : at + lengths[i]] = torch.arange(lengths[i])
            owner[r, at : at + lengths[i]] = i
            at += lengths[i]
        positions[r, at:] = torch.arange(width - at)
    src_row, src_col = mask.bool().nonzero(as_tuple=True)  # row-major: each row's real tokens in order
    rank = mask.long().cumsum(dim=1)[src_row, src_col] - 1  # the token's place in its sequence
    device = mask.device
    dst = (torch.tensor(row_of, device=device)[src_row], torch.tensor(start_of, device=device)[src_row] + rank)
    return Packing(tuple(mask.shape), (len(groups), width), (src_row, src_col), dst, positions.to(device),
                   owner.to(device))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# shared_prefix_packing widens its rows to twice the longest sequence only where neighbouring sequences share at
# least 1/SHARED_ENOUGH of the batch's tokens (a pair's 64-token prompt before two 64-token replies: 1/3).
SHARED_ENOUGH = 8


def shared_prefix_packing(ids: torch.Tensor, mask: torch.Tensor, width: int | None = None) -> Packing:
    """The Packing of a batch whose rows that begin alike hold their common beginning once (train.shared_prefix):
    DPO's chosen and rejected after their prompt, a ranking's completions, a GRPO group's samples. The sequences
    (mask's 1s) are sorted by their tokens, so that those sharing a beginning are neighbours, and placed in that
    order into rows of at most twice the longest sequence (as long as the longest where they share too little to
    pay for the wider rows: SHARED_ENOUGH; or `width`): each takes new columns only for its tokens past the
    common beginning with the sequence placed before it in the row, and reads that beginning's columns. A row is
    then a forest of prefix trees; `attend` lets each token see exactly its own sequence's earlier tokens (the
    shared columns and its own), and position ids count each sequence's tokens from 0 as a padded forward does.
    Every real token's output is then the one its sequence alone gives (a causal model's state at token t depends
    only on tokens 0..t), computed once per distinct beginning. Prefix sharing for DPO: Wang and Hegselmann 2024,
    "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv:2410.20305); here any common beginning
    in the batch is shared, found from the tokens, not told."""
    host_ids, host_mask = ids.cpu(), mask.cpu().bool()
    seqs = [row[m].tolist() for row, m in zip(host_ids, host_mask)]
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i], i))
    # Rows twice the longest sequence leave room for a beginning and two continuations, but cost attention over the
    # wider rows; a batch whose neighbours share little (PPO's one reply a prompt: a BOS token at most) gets rows as
    # wide as its longest sequence, which then pack back to back as padding_free's do.
    if width is None:
        saved = sum(_common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:]))
        width = (2 if saved * SHARED_ENOUGH >= sum(lengths) else 1) * max(lengths)
    placed: list[list[int]] = []  # the sequences of each packed row, in the order placed
    fill: list[int] = []  # columns used in each row
    loc: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(seqs)  # each sequence's columns
    shared = [0] * len(seqs)  # tokens each reads from the sequence placed before it
    for i in order:
        n = _common_prefix(seqs[placed[-1][-1]], seqs[i]) if placed else 0
        if not placed or fill[-1] + lengths[i] - n > width:
            placed.append([])
            fill.append(0)
            n = 0
        new = torch.arange(fill[-1], fill[-1] + lengths[i] - n)
        loc[i] = torch.cat([loc[placed[-1][-1]][:n], new]) if n else new
        shared[i] = n
        fill[-1] += lengths[i] - n
        placed[-1].append(i)
    R, W = len(placed), max(fill)
    positions, owner = torch.zeros(R, W, dtype=torch.long), torch.full((R, W), -1)
    attend = torch.zeros(R, W, W, dtype=torch.bool)
    row_of = [0] * len(seqs)
    for r, row in enumerate(placed):
        for i in row:
            row_of[i] = r
            cols, n = loc[i], shared[i]
            positions[r, cols] = torch.arange(lengths[i])
            owner[r, cols[n:]] = i
            # token t (its column cols[t]) sees the columns of tokens 0..t of its own sequence
            attend[r, cols[n:, None], cols[None, :]] = torch.ones(lengths[i], lengths[i], dtype=torch.bool).tril()[n:]
        tail = torch.arange(fill[r], W)  # unused columns: each sees itself only (no softmax over nothing)
        attend[r, tail, tail] = True
        positions[r, tail] = torch.arange(W - fill[r])
    device = mask.device
    src = mask.bool().nonzero(as_tuple=True)  # row-major: each row's real tokens in order, as loc lists them
    dst = (torch.tensor(row_of).repeat_interleave(torch.tensor(lengths)).to(device), torch.cat(loc).to(device))
    return Packing(tuple(mask.shape), (R, W), src, dst, positions.to(device), owner.to(device), attend.to(device))


def packed_rows(ids: torch.Tensor, mask: torch.Tensor, completion_mask: torch.Tensor, with_owner: bool = False):
    """encode_pairs' (B, T) rows packed padding-free (packing): (R, W) ids, position ids and completion mask, and
    with_owner the input row each token came from (-1 on the tails)."""
    p = packing(mask)
    # the tail holds a real token id, not padding: transformers warns of padding in a batch without attention mask
    out = (p.pack(ids, fill=int(ids[0, 0])), p.positions, p.pack(completion_mask))
    return out + (p.owner,) if with_owner else out


TRUNCATION_SIDES = ("left", "right")


def _cut_text(tokenizer, text: str, n: int, side: str) -> str:
    """`text` cut to n of its tokens: the last n (side 'left': the start is dropped) or the first n."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    kept = ids[len(ids) - n:] if side == "left" else ids[:n]
    return tokenizer.decode(kept if n > 0 else [], skip_special_tokens=False)


def truncate_prompt(tokenizer, prompt, max_length: int, side: str = "left"):
    """(prompt, whether it was cut) with encode_prompt(tokenizer, prompt) at most `max_length` tokens.

    side 'left' keeps the end of the prompt (the words just before the reply: TRL's DPO default, `keep_end`),
    'right' keeps its start. The cut is made on the text, so the template (BOS, role markers, the opened assistant
    turn) stays whole: a plain-text prompt loses tokens from that side; a conversation first loses whole turns from
    its start (a system message stays), and then the remaining first message's text is cut from `side`. A decoded
    cut can re-tokenise a token longer, so the cut shrinks until the prompt fits."""
    if len(encode_prompt(tokenizer, prompt)) <= max_length:
        return prompt, False
    if isinstance(prompt, list):
        messages = list(prompt)
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        rest = messages[len(system):]
        while len(rest) > 1 and len(encode_prompt(tokenizer, system + rest)) > max_length:
            rest = rest[1:]  # the oldest turn goes first
        if len(encode_prompt(tokenizer, system + rest)) <= max_length:
            return system + rest, True
        first, text = rest[0], rest[0].get("content", "")
        fit = lambda t: system + [{**first, "content": t}] + rest[1:]  # noqa: E731
    else:
        text, fit = prompt, lambda t: t  # noqa: E731
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    over = len(encode_prompt(tokenizer, prompt if not isinstance(prompt, list) else fit(text))) - max_length
    n -= over
    while n >= 0:
        cut = fit(_cut_text(tokenizer, text, n, side))
        if len(encode_prompt(tokenizer, cut)) <= max_length:
            return cut, True
        n -= 1
    raise DataError(f"max_prompt_length = {max_length} tokens leaves no room for the prompt: its template alone "
                    f"takes {len(encode_prompt(tokenizer, fit('')))}; raise data.max_prompt_length")


def encode_prompts(tokenizer, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Tq) left-padded query ids and mask."""
    return pad_left([encode_prompt(tokenizer, p) for p in prompts], pad_id(tokenizer))


def encode_pairs(tokenizer, prompts: list, completions: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion+end-of-turn sequences (encode_example).

    Returns input_ids (B, T), attention_mask (B, T) and completion_mask (B, T): 1 on completion tokens
    (EOS or end-of-turn included), the tokens that SFT learns and that a reward model's last-token score follows.
    """
    seqs, comp = zip(*(encode_example(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True))) \
        if prompts else ((), ())
    ids, mask = pad_right(list(seqs), pad_id(tokenizer))
    completion_mask, _ = pad_right(list(comp), 0)
    return ids, mask, completion_mask


def check_representable(tokenizer, texts: list[tuple[str, str]], source: str, role: str, limit: float = 0.01) -> None:
    """Refuse text the tokenizer cannot represent: more than `limit` of its tokens are <unk>.

    `texts` are (where, text) pairs, `where` naming the record and field for the message. A word-level
    tokenizer turns any unknown word into <unk>, so English text under the digits tokenizer would train a
    model on nothing but <unk> and still report a perfect score. Byte-level tokenizers have no <unk>.
    """
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return
    # A literal "<unk>" in the text is the policy's own sampled token (decoded as is), not unknown text.
    texts = [(where, text if isinstance(text, str) else "\n".join(m["content"] for m in text)) for where, text in texts]
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
