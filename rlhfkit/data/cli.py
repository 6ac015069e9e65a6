"""`rlhfkit data`: convert data files between formats and check them (rlhfkit.data.load).

    rlhfkit data convert IN OUT [--from FORMAT] [--to FORMAT] [--split SPLIT]
    rlhfkit data check FILE [--as KIND] [--from FORMAT] [--split SPLIT] [--show N]
    rlhfkit data formats
"""

from __future__ import annotations

import argparse
import sys

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.data.formats import FORMATS, KINDS, format_table
from rlhfkit.data.load import check_file, convert_file

FORMAT_HELP = "the input's format (default: told from the first record's fields); see `rlhfkit data formats`"
SPLIT_HELP = "the split of a DatasetDict directory (default: train, or its only split)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit data", description="Read preference, ranking, SFT and prompt data in the formats people have "
        "(TRL, Anthropic HH, UltraFeedback, chat conversations; JSONL, JSON, Parquet, `datasets` directories).")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a data file to another format or container",
                          description="Read IN and write its records to OUT (atomically). The container follows OUT's "
                                      "suffix (.jsonl, .json, .parquet, .txt; none: a `datasets` directory); the format "
                                      "is --to, default the rlhfkit contract of the records' kind.")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--from", dest="from_fmt", choices=list(FORMATS), metavar="FORMAT", help=FORMAT_HELP)
    conv.add_argument("--to", dest="to_fmt", choices=list(FORMATS), metavar="FORMAT",
                      help="the output's format (default: comparisons, rankings, sft or prompts, as the input holds)")
    conv.add_argument("--split", help=SPLIT_HELP)
    check = sub.add_parser("check", help="count a data file's records and list its problems",
                           description="Read FILE, print its format, what it holds and every record that cannot be "
                                       "read (the first --show of them). Exit status 1 when there are problems.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--as", dest="as_kind", choices=list(KINDS), metavar="KIND",
                       help=f"also read it as this kind ({', '.join(KINDS)}), as a pipeline stage would")
    check.add_argument("--from", dest="from_fmt", choices=list(FORMATS), metavar="FORMAT", help=FORMAT_HELP)
    check.add_argument("--split", help=SPLIT_HELP)
    check.add_argument("--show", type=int, default=10, metavar="N", help="problems to print (default 10)")
    sub.add_parser("formats", help="list the formats and what their records look like")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "formats":
            print(f"{'format':<20} {'kind':<9} a record\n" + format_table())
            return 0

        if args.command == "convert":
            r = convert_file(args.input, args.output, args.from_fmt, args.to_fmt, args.split)
            print(f"{args.input}: {r['read']} records ({r['format']}) -> {args.output}: "
                  f"{r['written']} {KINDS[FORMATS[r['to_format']].kind]} ({r['to_format']})")
            return 0
        report = check_file(args.file, args.as_kind, args.from_fmt, args.split)
        print(format_check(report, args.show))
        return 2 if report["problems"] else 0  # bad input: the CLI's status for it, as every other command
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def format_check(r: dict, show: int = 10) -> str:
    how = f"told from the fields of {r['detected_from']}" if r["detected_from"] else "as given"
    lines = [f"{r['path']}: {r['rows']} records",
             f"  format: {r['format']} ({how})" if r["format"] else "  format: unknown (no record could be read)"]
    if r["kind"]:
        lines.append(f"  holds: {r['records']} {KINDS[r['kind']]}")
    if "as_kind" in r:
        lines.append(f"  as {KINDS[r['as_kind']]}: {r['as_records']}")
    if "items" in r:
        lines.append(f"  items (distinct item ids): {r['items']}; with a conversation prompt: {r['conversations']}")
    if r.get("criteria"):
        lines.append("  criteria: " + ", ".join(f"{c} {n}" for c, n in r["criteria"].items()))
    problems = r["problems"]
    if problems:
        lines.append(f"problems: {len(problems)}" + (f" (the first {show})" if len(problems) > show else ""))
        lines += [f"  {p}" for p in problems[:show]]
    else:
        lines.append("no problems")
    return "\n".join(lines)
