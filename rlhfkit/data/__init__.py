"""Data: the one record contract shared by labelers, the labeling app and every trainer.

    contract    the records (Comparison, RankingRecord, Demonstration, PromptRecord), text or conversation
    formats     TRL, Anthropic HH, UltraFeedback, chat `messages`, ...: a row <-> contract records
    containers  JSONL, JSON, Parquet, `datasets` directories, .txt: a file <-> rows (atomic writes)
    load        load_pairs / load_rankings / load_demonstrations / load_prompts / save_records
    chat        chat templates: token ids and the assistant-turn loss mask
    batching    tokenising and padding text prompt/completion pairs
    ranked      whole K-way rankings as training data (the listwise losses)
    cli         `rlhfkit data convert` / `rlhfkit data check`
    splits      train / held-out split by item, one rule for every stage
    preferences the comparisons or rankings a stage reads (one criterion, split, checked against a tokenizer)
    consensus   several labelers' rankings -> positions, pairwise majority, Borda

Layer: data. May import: ops, core.
"""
