"""The policy every method starts from and the reference pi_ref it is held to, made in one place.

    policy, reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed)   # PPO, RLOO, GRPO, DPO, ReST, ...

`Reference` is the one interface to pi_ref, in three forms:
- a frozen copy of the SFT policy (InstructGPT's pi_SFT), when the policy trains every weight (lora.r = 0);
- the LoRA policy with its adapter disabled (lora.r > 0): the same weights, so no second copy in memory
  (rlhfkit/models/lora.py);
- a table of sequence log-probs computed once (DPO's cache, `dpo.reference = "cached"`).
`logprobs(...)` gives per-token log-probs of sampled responses (the online methods and self-training), `rows(...)`
sequence log-probs of encoded rows (DPO). `forwards` and `sequences` count the forward passes run and the rows
they scored, so a test can prove what a cache spares.

Layer: models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.core.runio import progress
from rlhfkit.models.engine import cat_over_processes, my_share
from rlhfkit.models.forward import disable_dropout, forward_response, freeze, row_logprobs
from rlhfkit.models.load import load_policy
from rlhfkit.models.lora import AdapterDisabled, wrap_lora
from rlhfkit.models.runtime import Runtime


class Reference:
    """pi_ref: a model run on demand (a frozen copy, or the adapter-disabled LoRA policy), or a table
    {split: (M,)} of sequence log-probs computed once."""

    def __init__(self, model=None, table: dict | None = None):
        assert (model is None) != (table is None), "a reference is a model or a table, not both"
        self.model, self.table = model, table
        self.forwards, self.sequences = 0, 0

    @torch.no_grad()
    def logprobs(self, queries, query_mask, responses, response_mask, temperature: float, rt: Runtime) -> torch.Tensor:
        """(B, Tr) log pi_ref(response_t | query, response_<t), at the sampling temperature."""
        self.forwards += 1
        self.sequences += len(queries)
        return forward_response(self.model, None, queries, query_mask, responses, response_mask, temperature, rt)[0]

    def rows(self, split: str, seqs, rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
        """(len(rows),) sequence log-probs of rows `rows` of a split's sequences seqs = (ids, mask, completion_mask):
        looked up in the table, or one forward."""
        if self.table is not None:  # the table on the device, `rows` wherever the data is
            return self.table[split][rows.to(self.table[split].device)]
        return self.forward(seqs, rows, rt)

    @torch.no_grad()
    def forward(self, seqs, rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
        self.forwards += 1
        self.sequences += len(rows)
        return row_logprobs(self.model, seqs, rows, rt)

    def table_of(self, seqs, row_batches: list[torch.Tensor], rt: Runtime, desc: str | None = None) -> torch.Tensor:
        """(M,) log-probs of every row of `seqs`, one forward per batch of rows (batches covering every row once);
        with a progress bar (sequences scored, ETA) when `desc` is given: on a real model this takes minutes. Under
        several processes each forwards its share of the batches and every process gets the whole table (call it
        on every process together)."""
        table = torch.zeros(len(seqs[0]), device=rt.device)
        if not row_batches:
            return table
        mine = [row_batches[b] for b in my_share(len(row_batches))]
        bar = progress(sum(len(rows) for rows in mine), desc, unit="seq") if desc is not None else None
        values = []
        for rows in mine:
            values.append(self.forward(seqs, rows, rt).float())
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        table[torch.cat(row_batches).to(table.device)] = cat_over_processes(values, table.device)  # shares in order
        return table


def policy_and_reference(sft_dir: Path, lc, rt: Runtime, seed: int, resume_from: Path | None = None,
                         frozen_copy: bool = True) -> tuple[object, Reference | None]:
    """The policy to train (from `resume_from` when resuming: a model, or an adapter, directory) and the reference
    pi_ref = the SFT policy. Without LoRA (lc.r == 0, lc: the [lora] section): two full models, the reference a
    frozen copy with dropout off (None with frozen_copy = False: a caller that caches the reference's log-probs
    from the untrained policy). With LoRA: one model; the policy trains a new adapter (drawn from `seed`), the
    reference is the same model with the adapter disabled."""
    if lc.r == 0:
        policy = load_policy(resume_from or sft_dir, rt.device, "policy")
        if not frozen_copy:
            return policy, None
        return policy, Reference(freeze(disable_dropout(load_policy(sft_dir, rt.device, "reference policy"))))
    base = load_policy(sft_dir, rt.device, "sft policy")
    if resume_from is not None:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        policy = wrap_lora(base, lc, sft_dir, seed)
    return policy, Reference(AdapterDisabled(policy))
