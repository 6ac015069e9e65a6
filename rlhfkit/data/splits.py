"""Train / held-out splits by item: one rule for every stage (the reward model, DPO, a prompt file's evaluation
prompts, SFT's held-out demonstrations), so no prompt is on both sides and every stage holds out the same items.

Layer: data.
"""

from __future__ import annotations

import hashlib

from rlhfkit.data.contract import Comparison


def is_heldout(item_id: str, heldout_fraction: float, seed: int) -> bool:
    """Whether the item is held out: a hash of the seed and item id, so no prompt is in both splits and every
    stage (reward model, DPO, either loss) holds out the same items."""
    h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < heldout_fraction


def split_by_item(comparisons: list[Comparison], heldout_fraction: float, seed: int):
    """Deterministic train / held-out split by item (is_heldout)."""
    train = [c for c in comparisons if not is_heldout(c.item_id, heldout_fraction, seed)]
    test = [c for c in comparisons if is_heldout(c.item_id, heldout_fraction, seed)]
    return train, test
