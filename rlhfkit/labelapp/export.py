"""Export: the records the trainers read (rlhfkit.data.contract), with no conversion step.

Written to OUT:
    comparisons.jsonl   Comparison records: one per strict preference of the item's consensus
    rankings.jsonl      RankingRecord per labeler and criterion (the raw rankings, original indices)
    consensus.jsonl     RankingRecord per item and criterion: the Borda consensus (labeler_id "consensus")
    elo.json            Elo ladder per criterion when completions come from several models
    export.json         counts, agreement figures and settings; written last, so its presence marks a
                        complete export
A thumbs project (settings.mode = "thumbs") writes instead:
    thumbs.jsonl        Thumb records: one per labeler, completion and criterion (prompt, completion, label
                        true = up), the unpaired records KTO trains on (contract.read_thumbs reads them)
    export.json         as above

Rules (documented in docs/labeling.md):
- Comparisons come from pairwise majority over the item's labelers (agreement.majority_pairs): i beats j
  when more than half of them ranked i strictly above j; `labeler_ids` lists those supporters. With one
  labeler this is every strict preference of their ranking.
- Margin: a labeler who gave strengths between adjacent ranks supports (i, j) with the margin of the
  strongest step between i's and j's tie groups (contract.pair_margin, STRENGTH_MARGINS); the comparison's
  margin is the mean over its supporters. Without strengths the margin is null. The rankings carry the
  labels themselves (`strengths`).
- min_agreement: an item whose mean pairwise agreement between its labelers is below the threshold on
  any of the project's criteria is left out entirely (comparisons, rankings and consensus of every
  criterion). Items with a single labeler have no agreement and are kept.
- OUT must be new, empty, or hold a previous export (whose files are replaced); anything else there is
  refused rather than mixed with the export.
- A pair whose two completions are the same text yields no comparison (the contract forbids it).
- Thumbs: every thumb is exported as given (no consensus: KTO weighs each record); min_agreement and
  complete_only leave out items as for rankings, agreement being the share of labeler pairs that gave a
  reply the same thumb (stats.thumbs_agreement).
"""

from __future__ import annotations

import json
import statistics
import time
from itertools import combinations
from pathlib import Path

from rlhfkit.core.errors import ConfigError
from rlhfkit.data.consensus import borda_consensus, majority_pairs
from rlhfkit.data.contract import Comparison, RankingRecord, Thumb, pair_margin, write_jsonl
from rlhfkit.feedback.agreement import pairwise_agreement
from rlhfkit.labelapp import db
from rlhfkit.labelapp.project import get_settings
from rlhfkit.labelapp.stats import by_item, load_labels, project_stats, thumbs_agreement

EXPORT_FILES = ("comparisons.jsonl", "rankings.jsonl", "consensus.jsonl", "elo.json", "thumbs.jsonl", "export.json")


def export_project(project_dir: str | Path, out_dir: str | Path, *, min_agreement: float | None = None,
                   complete_only: bool = False) -> dict:
    """Write the export; returns the summary also saved as export.json."""
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement: {min_agreement} must be between 0 and 1")
    if not db.db_path(project_dir).is_file():
        raise ConfigError(f"{project_dir}: no labeling project here (create one with `rlhfkit label create`)")
    with db.opened(project_dir) as conn:
        settings = get_settings(conn)
        if settings is None:
            raise ConfigError(f"{project_dir}: the project has not been created yet")
        labels = load_labels(conn)
        stats = project_stats(conn, settings)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)

    comparisons, rankings, consensus = [], [], []
    identical_pairs = 0
    counts, key_of = {}, {}
    for lab in labels:
        counts[lab["item_id"]] = counts.get(lab["item_id"], 0) + 1
        key_of[lab["item_id"]] = lab["item_key"]
    wanted = {item for item, n in counts.items() if not complete_only or n >= settings.overlap}
    if settings.mode == "thumbs":
        return export_thumbs(out_dir, settings, labels, stats, wanted, key_of, min_agreement)
    # 1. items left out whole: their labelers' mean pairwise agreement is below the threshold on any criterion
    dropped = set()
    for criterion in settings.criteria if min_agreement is not None else ():
        for item, labs in by_item(labels, criterion).items():
            ranks = [lab["rankings"][criterion] for lab in labs]
            if item in wanted and len(ranks) >= 2 and statistics.fmean(
                    pairwise_agreement(a, b) for a, b in combinations(ranks, 2)) < min_agreement:
                dropped.add(item)
    # 2. every criterion's records of the items kept
    for criterion in settings.criteria:
        for item, labs in sorted(by_item(labels, criterion).items()):
            if item not in wanted or item in dropped:
                continue
            ranks = [lab["rankings"][criterion] for lab in labs]
            first = labs[0]
            texts = first["completions"]
            for lab in labs:
                rankings.append(RankingRecord(first["item_key"], first["prompt"], texts, lab["labeler"],
                                              lab["rankings"][criterion], criterion, lab["strengths"].get(criterion)))
            consensus.append(RankingRecord(first["item_key"], first["prompt"], texts, "consensus",
                                           borda_consensus(ranks), criterion))
            for better, worse, support in majority_pairs(ranks):
                if texts[better] == texts[worse]:
                    identical_pairs += 1
                    continue
                margins = [pair_margin(ranks[n], labs[n]["strengths"][criterion], better, worse)
                           for n in support if criterion in labs[n]["strengths"]]
                comparisons.append(Comparison(
                    item_id=first["item_key"], prompt=first["prompt"], chosen=texts[better], rejected=texts[worse],
                    margin=statistics.fmean(margins) if margins else None,
                    labeler_ids=[labs[n]["labeler"] for n in support], criterion=criterion,
                ))

    (out_dir / "export.json").unlink(missing_ok=True)  # a half-rewritten export must not look complete
    write_jsonl(out_dir / "comparisons.jsonl", comparisons)
    write_jsonl(out_dir / "rankings.jsonl", rankings)
    write_jsonl(out_dir / "consensus.jsonl", consensus)
    (out_dir / "elo.json").write_text(json.dumps(stats["elo"], indent=2), encoding="utf-8")
    summary = {
        "project": settings.name,
        "created_at": time.time(),
        "comparisons": len(comparisons),
        "rankings": len(rankings),
        "items_exported": len({r.item_id for r in consensus}),
        "items_dropped_low_agreement": sorted(key_of[i] for i in dropped),
        "pairs_skipped_identical_text": identical_pairs,
        "min_agreement": min_agreement,
        "stats": {k: v for k, v in stats.items() if k not in ("flags",)},
    }
    (out_dir / "export.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def export_thumbs(out_dir: Path, settings, labels: list[dict], stats: dict, wanted: set[int], key_of: dict[int, str],
                  min_agreement: float | None) -> dict:
    """A thumbs project's export: thumbs.jsonl (contract.Thumb, one record per labeler, completion and
    criterion, items and completions in their original order) and export.json."""
    # 1. items left out whole: the share of agreeing labeler pairs is below the threshold on any criterion
    dropped = set()
    for criterion in settings.criteria if min_agreement is not None else ():
        for item, labs in by_item(labels, criterion, "thumbs").items():
            agreement = thumbs_agreement([[lab["thumbs"][criterion] for lab in labs]])
            if item in wanted and agreement is not None and agreement < min_agreement:
                dropped.add(item)
    # 2. every thumb of the items kept
    thumbs = [Thumb(item_id=lab["item_key"], prompt=lab["prompt"], completion=text, label=label,
                    labeler_id=lab["labeler"], criterion=criterion)
              for criterion in settings.criteria
              for item, labs in sorted(by_item(labels, criterion, "thumbs").items()) if item in wanted - dropped
              for lab in labs
              for text, label in zip(lab["completions"], lab["thumbs"][criterion], strict=True)]

    (out_dir / "export.json").unlink(missing_ok=True)  # a half-rewritten export must not look complete
    write_jsonl(out_dir / "thumbs.jsonl", thumbs)
    summary = {
        "project": settings.name,
        "mode": settings.mode,
        "created_at": time.time(),
        "thumbs": len(thumbs),
        "thumbs_up": sum(t.label for t in thumbs),
        "items_exported": len({t.item_id for t in thumbs}),
        "items_dropped_low_agreement": sorted(key_of[i] for i in dropped),
        "min_agreement": min_agreement,
        "stats": {k: v for k, v in stats.items() if k not in ("flags",)},
    }
    (out_dir / "export.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def check_out_dir(out_dir: Path) -> None:
    """OUT must be new, empty, or a previous export: never a file, never a directory of other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export directory {out_dir}: exists and is not a directory; choose a new directory")
    if out_dir.is_dir():
        # write_jsonl's temporary files (.NAME.*.tmp) may be left by a killed export: not foreign
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in EXPORT_FILES and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise ConfigError(f"export directory {out_dir}: already holds other files ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); export into a new or empty directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"export directory {out_dir}: cannot create it ({e.strerror})") from None
