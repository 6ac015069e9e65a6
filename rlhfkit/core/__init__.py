"""Core layer, the lowest: what every other layer may use, free of torch.

    errors.py   RlhfkitError and its kinds: a message for the user, printed by the CLI (exit status 2)
    config.py   config machinery: typed fields with their help, TOML and `--set` layers with each key's origin,
                checks whose messages say where a value came from, TOML out
    runio.py    run directories: atomic JSON, stage markers, JSONL metrics, progress bars
    generation.py  a model directory's sampling defaults (generation_config.json)
    hosts.py    Host headers the two web servers check (the labeling app, `rlhfkit serve`)

May import: nothing else of rlhfkit.
"""
