"""Pipeline layer: the whole run, stage by stage, and its configuration.

    config.py    `Config`, assembled from the stages' sections and each registered method's, and `load_config`
                 (the task's defaults merged under the file and `--set`)
    stages.py    the stages, their output directories, what is up to date, resuming; run_stage / run_pipeline
    compare.py   `rlhfkit compare`: several methods from the same SFT model, feedback and reward model

May import: labelapp, tasks, feedback, evaluation, algorithms, spine, models, data, ops, core (never cli).
"""
