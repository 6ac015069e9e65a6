"""The `rlhfkit` command. Every command is a thin wrapper over a plain Python call (rlhfkit.pipeline).

Layer: cli, the top. `rlhfkit --help` imports no torch: the methods are listed from the registry's names and
summaries (rlhfkit.algorithms.REGISTRY); the pipeline, and with it torch, is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlhfkit.algorithms import REGISTRY
from rlhfkit.core import dist

STAGE_HELP = {
    "sft": "supervised fine-tuning on demonstrations (the task's, or data.sft)",
    "feedback": "sample K completions per prompt and rank them (simulated or human labelers, or an AI judge)",
    "reward": "train the reward model: Bradley-Terry on comparisons or Plackett-Luce on rankings (reward.loss)",
    "toxicity": "fine-tune the toxicity classifier (MiniLM by default) on labelled replies (toxicity.enabled)",
    **REGISTRY,
    "eval": "evaluate the SFT policy and the method's policy on held-out prompts and write the report",
}


CONFIG_HELP = ("TOML config file (default: OUT/config.toml when it exists, the config an earlier run there saved, "
               "so a rerun resumes with it; else the task's built-in defaults). --set overrides go on top")
SET_HELP = "override a config field, e.g. --set ppo.kl_coef=0 (repeatable; the value is read as TOML)"


def _add_config_args(p: argparse.ArgumentParser, out_required: bool) -> None:
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--out", required=out_required, help="output directory" + ("" if out_required else " (default runs/TASK)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)


def build_parser() -> argparse.ArgumentParser:
    from rlhfkit import __version__

    parser = argparse.ArgumentParser(prog="rlhfkit", description="The complete RLHF loop: SFT -> feedback -> reward model -> PPO (or another `method`) -> evaluation.")
    parser.add_argument("--version", action="version", version=f"rlhfkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (skips finished stages, resumes PPO)",
                         description="Run every stage into OUT, skipping those already up to date and resuming an interrupted PPO run.")
    _add_config_args(run, out_required=False)
    run.add_argument("--update", action="store_true",
                     help="redo the stages whose config changed, and those after them (without it a changed config is refused)")
    for name, help_text in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        _add_config_args(p, out_required=True)
        p.add_argument("--fresh", action="store_true", help="redo the stage even if it is complete")
    compare = sub.add_parser(
        "compare", help="run several methods from the same SFT model, feedback and reward model and compare them",
        description="Run every method of compare.methods (default: all; or --methods) from the same SFT model, "
                    "comparisons and reward model into OUT, evaluate them on the same held-out prompts and write "
                    "OUT/compare/report.md: a table, curves, head-to-head win rates and Elo ladders.")
    _add_config_args(compare, out_required=False)
    compare.add_argument("--methods", nargs="+", metavar="METHOD", choices=list(REGISTRY),
                         help=f"methods to compare (default: compare.methods, else all: {', '.join(REGISTRY)})")
    compare.add_argument("--update", action="store_true", help="redo the stages whose config changed")
    judge = sub.add_parser(
        "judge", help="how well the AI judge of [judge] agrees with your labels (AI-labeler alignment)",
        description="Ask the AI judge of [judge] about every comparison of a labelled preference file (any format "
                    "rlhfkit reads) and report the share where it prefers the labelled reply (Lee et al.'s "
                    "AI-labeler alignment), per criterion, with its position bias and cost; writes "
                    "OUT/judge_agreement/agreement.json and judged.jsonl.")
    _add_config_args(judge, out_required=True)
    judge.add_argument("--labels", required=True, metavar="FILE", help="the preference file people labelled")
    judge.add_argument("--limit", type=int, default=0, metavar="N", help="judge the first N comparisons (0 = all)")
    merge = sub.add_parser("merge", help="merge a LoRA adapter directory into its base: a plain model directory",
                           description="Write the LoRA adapter in ADAPTER_DIR (e.g. OUT/ppo/model of a run with "
                                       "lora.r > 0) merged into its base model as a plain model directory OUT_DIR.")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    cfg = sub.add_parser("config", help="print the resolved config as TOML (every field, with its help)",
                         description="Print the resolved config as TOML: every field with its value and help, "
                                     "ready to edit and pass back as `rlhfkit run FILE`.")
    cfg.add_argument("config", nargs="?", help="TOML config file to resolve (default: the task's built-in defaults)")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    sub.add_parser("label", help="the labeling web app: `rlhfkit label --help`", add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible server for a policy directory: `rlhfkit serve --help`",
                   add_help=False)
    sub.add_parser("data", help="convert and check data files (TRL, HH, UltraFeedback, ...): `rlhfkit data --help`",
                   add_help=False)
    sub.add_parser("model", help="convert models, e.g. a GGUF file to a model directory: `rlhfkit model --help`",
                   add_help=False)
    return parser


def build_model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit model", description="Convert models into the plain Hugging Face "
                                     "directories rlhfkit loads (policy.path, reward.init, ...).")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("from-gguf", help="a GGUF file (llama.cpp, Ollama) as a model directory",
                          description="Dequantize the GGUF model FILE and write it to OUT_DIR (a new directory) as "
                                      "safetensors weights, config.json, generation_config.json, the tokenizer and "
                                      "its chat template. Needs the gguf extra: pip install 'rlhfkit[gguf]'.")
    conv.add_argument("file", metavar="FILE", help="a .gguf model file (llama.cpp, Ollama)")
    conv.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write (must not exist yet)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],  # models.gguf.DTYPES
                      help="the weights' dtype (default float32, what rlhfkit trains in)")
    return parser


def model_main(argv: list[str]) -> int:
    args = build_model_parser().parse_args(argv)
    from rlhfkit.core.errors import RlhfkitError
    from rlhfkit.models.gguf import convert_gguf

    try:
        r = convert_gguf(args.file, args.out_dir, args.dtype)
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out_dir} was not written", file=sys.stderr)
        return 130
    print(f"{r['out_dir']}: {r['parameters']:,} parameters ({r['architecture']}, {args.dtype}"
          f"{', with its chat template' if r['chat_template'] else ''})")
    return 0


def _config_for(args, origins: dict | None = None):
    """The config file given, else OUT/config.toml when an earlier run saved one there (so rerunning a
    command on the same --out resumes with that run's config), else the task's defaults; --set on top.
    `origins` is filled with where each value came from (load_config)."""
    from rlhfkit.core.config import parse_override
    from rlhfkit.pipeline.config import Config, load_config

    path = args.config
    if path is None and args.command != "config":
        out = args.out
        if out is None:  # `run` without --out: runs/TASK, TASK as --set (or the default) gives it
            tasks = [d["task"] for d in map(parse_override, args.overrides) if "task" in d]
            out = f"runs/{tasks[-1] if tasks else Config().task}"
        if (Path(out) / "config.toml").is_file():
            path = Path(out) / "config.toml"
    return load_config(path, args.overrides, validate=args.command != "config", origins=origins)


def _say_model_defaults(cfg, origins: dict, sections: set[str]) -> None:
    """One line at the start of a run: the defaults the model in policy.path brought that stand (learning rates
    for a pretrained model, its generation_config.json's sampling filters), for the stages that will run."""
    from rlhfkit.pipeline.config import model_default_lines

    lines = model_default_lines(origins, cfg, sections | {"sampling"})
    if lines:
        print(f"[rlhfkit] defaults for the model in policy.path (set any to change it): {'; '.join(lines)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not dist.is_main_process():  # one of several processes (`accelerate launch`): the main one reports the run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    if argv and argv[0] == "label":  # the web app has its own parser and dependencies
        from rlhfkit.labelapp.cli import main as label_main

        return label_main(argv[1:])
    if argv and argv[0] == "serve":  # the OpenAI-compatible server has its own parser and dependencies
        from rlhfkit.serve.cli import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "data":  # data files: its own parser
        from rlhfkit.data.cli import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "model":  # model conversion: its own parser
        return model_main(argv[1:])
    args = build_parser().parse_args(argv)
    from rlhfkit.core.errors import RlhfkitError
    from rlhfkit.pipeline.stages import WaitingForLabels

    try:
        return _dispatch(args)
    except WaitingForLabels as e:
        print(f"[rlhfkit] {e}", file=sys.stderr)
        return 3
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from rlhfkit.core.config import config_to_toml
    from rlhfkit.pipeline import stages as pipeline

    if args.command == "merge":
        from rlhfkit.models.load import merge_adapter

        print(f"merged: {merge_adapter(args.adapter_dir, args.out_dir)}")
        return 0
    origins: dict = {}
    cfg = _config_for(args, origins)
    if args.command == "config":  # a template to fill in: what it still lacks is said on top, not refused
        from rlhfkit.core.errors import ConfigError
        from rlhfkit.pipeline.config import model_default_lines

        try:
            cfg.validate()
        except ConfigError as e:
            print(f"# Not runnable as it stands: {' '.join(str(e).split())}\n")
        lines = model_default_lines(origins, cfg)
        if lines:  # values that came from the model in policy.path, not from rlhfkit's defaults or yours
            print("# Defaults for the model in policy.path (anything you set wins):\n"
                  + "".join(f"#   {line}\n" for line in lines))
        print(config_to_toml(cfg), end="")
        return 0
    if args.command == "run":
        _say_model_defaults(cfg, origins, set(pipeline.pipeline_stages(cfg)))
        out = Path(args.out or f"runs/{cfg.task}")
        summary = pipeline.run_pipeline(cfg, out, update=args.update)
        if "eval" in summary:
            print(f"\nreport: {out / 'eval' / 'report.md'}\nsummary: {out / 'summary.json'}\n")
            print(pipeline.format_results_table(summary))
        return 0
    if args.command == "compare":
        import dataclasses

        from rlhfkit.pipeline.compare import run_compare

        if args.methods:
            cfg = dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, methods=args.methods))
        _say_model_defaults(cfg, origins, {"sft", "reward", *(cfg.compare.methods or REGISTRY)})
        out = Path(args.out or f"runs/{cfg.task}")
        result = run_compare(cfg, out, update=args.update)
        print(f"\nreport: {out / result['report']}")
        return 0
    if args.command == "judge":
        result = pipeline.judge_labels(cfg, args.labels, Path(args.out), args.limit)
        by = ", ".join(f"{c} {a:.3f}" for c, a in result["judge_alignment_by_criterion"].items())
        print(f"judge agreement with {args.labels}: {result['judge_alignment_with_labels']:.3f} over "
              f"{result['n_comparisons']} comparisons ({by}); position bias {result['judge_position_bias']:.3f}; "
              f"{result['judge_inputs']} judge inputs, {result['judge_cached']} cached\n"
              f"written: {Path(args.out) / 'judge_agreement'}")
        return 0
    _say_model_defaults(cfg, origins, {args.command})
    result = pipeline.run_stage(args.command, cfg, Path(args.out), fresh=args.fresh)
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    print("\n".join(f"{args.command}.{k} = {v:.4g}" if isinstance(v, float) else f"{args.command}.{k} = {v}"
                    for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
