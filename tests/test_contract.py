"""The data contract: rankings -> pairs, validation, and errors that name file, line and field."""

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import (
    STRENGTH_MARGINS,
    Comparison,
    RankingRecord,
    Thumb,
    pair_margin,
    ranking_from_scores,
    ranking_to_pairs,
    read_comparisons,
    read_rankings,
    record_kind,
    validate_ranking,
    write_jsonl,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def test_ranking_to_pairs_counts_and_ties():
    assert ranking_to_pairs([[2], [0], [1]]) == [(2, 0), (2, 1), (0, 1)]
    pairs = ranking_to_pairs([[1], [0, 3], [2]])
    assert len(pairs) == 1 * 2 + 1 * 1 + 2 * 1
    assert (0, 3) not in pairs and (3, 0) not in pairs  # ties give no pair
    assert ranking_to_pairs([[0, 1, 2]]) == []
    # K completions, no ties: C(K, 2) pairs.
    assert len(ranking_to_pairs([[i] for i in range(9)])) == 36


def test_ranking_from_scores():
    assert ranking_from_scores([1.0, 2.0, 1.0, 0.0]) == [[1], [0, 2], [3]]


@pytest.mark.parametrize("bad", [[[0], [0]], [[0], [2]], [[0, 1]], [], [[0], []], [[0], ["1"]], "0 1"])
def test_validate_ranking_rejects_non_permutations(bad):
    with pytest.raises(DataError):
        validate_ranking(bad, 3, "x")


def test_roundtrip(tmp_path):
    recs = [Comparison("a", "p", "c", "r", 0.5, ["u1"]), Comparison("b", "p", "x", "y")]
    write_jsonl(tmp_path / "c.jsonl", recs)
    assert read_comparisons(tmp_path / "c.jsonl") == recs
    rk = [RankingRecord("a", "p", ["x", "y", "z"], "u1", [[2], [0, 1]]),
          RankingRecord("a", "p", ["x", "y", "z"], "u2", [[0], [1], [2]], strengths=["better", "negligibly"])]
    write_jsonl(tmp_path / "r.jsonl", rk)
    assert read_rankings(tmp_path / "r.jsonl") == rk
    assert record_kind(tmp_path / "r.jsonl") == "rankings" and record_kind(tmp_path / "c.jsonl") == "comparisons"


@pytest.mark.parametrize("line,needle", [
    ('{"item_id": "a", "prompt": "p", "chosen": "c"', "not valid JSON"),
    ('{"item_id": "a", "prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
    ('{"item_id": "a", "prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
    ('{"item_id": "a", "prompt": "p", "chosen": "c", "rejected": "c"}', "identical"),
    ('{"item_id": "a", "prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}', "field 'margin'"),
    ('[1, 2]', "JSON object"),
])
def test_bad_comparison_lines_name_file_and_line(tmp_path, line, needle):
    good = json.dumps({"item_id": "a", "prompt": "p", "chosen": "c", "rejected": "r"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_comparisons(path)
    assert f"{path}:3" in str(e.value) and needle in str(e.value)


def test_bad_ranking_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"item_id": 1, "prompt": "p", "completions": ["a", "b"], "labeler_id": "u",
                                "ranking": [[0], [0]]}) + "\n")
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'ranking'.*not a permutation"):
        read_rankings(path)


RANKING = {"item_id": "a", "prompt": "p", "completions": ["x", "y", "z"], "labeler_id": "u", "ranking": [[1], [0, 2]]}


@pytest.mark.parametrize("change,needle", [
    ({"ranking": [[1], [0, 1]]}, "field 'ranking': [1, 0, 1] is not a permutation of 0..2"),
    ({"ranking": None}, "missing field 'ranking'"),
    ({"ranking": "1 0 2"}, "field 'ranking' must be a list"),
    ({"completions": ["x"]}, "field 'completions' must list at least 2 completions"),
    ({"labeler_id": None}, "missing field 'labeler_id'"),
    ({"strengths": ["slightly", "better"]}, "field 'strengths' must list 1 strength(s)"),
    ({"strengths": ["hugely"]}, "field 'strengths'"),
    ({"strengths": [["better"]]}, "field 'strengths'"),
    ({"completions": ["x", "y", "w"]}, "field 'completions' differs from that of item 'a' at "),
    ({"prompt": "q"}, "field 'prompt' differs from that of item 'a' at "),
])
def test_bad_ranking_lines_name_file_line_and_field(tmp_path, change, needle):
    """Line 3 is bad (line 2 blank): the message names the file, the line and the field."""
    path = tmp_path / "r.jsonl"
    bad = {k: v for k, v in {**RANKING, "labeler_id": "v", **change}.items() if v is not None}
    path.write_text(json.dumps(RANKING) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_rankings(path)
    assert str(e.value).startswith(f"{path}:3: ") and needle in str(e.value), str(e.value)
    if "differs" in needle:
        assert str(e.value).endswith(f"at {path}:1; every ranking of one item must list the same prompt and "
                                     "completions, in the same order")


def test_empty_rankings_file_and_unknown_records(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="contains no rankings"):
        read_rankings(tmp_path / "e.jsonl")
    (tmp_path / "x.jsonl").write_text('{"item_id": "a", "text": "t"}\n')
    assert record_kind(tmp_path / "x.jsonl") == "comparisons"  # whose reader names the missing fields
    with pytest.raises(DataError, match="contains no records"):
        record_kind(tmp_path / "e.jsonl")


def test_pair_margin_is_the_strongest_step_between_the_groups():
    ranking, steps = [[2], [0, 3], [1], [4]], ["slightly", "significantly", "negligibly"]
    assert pair_margin(ranking, steps, 2, 0) == STRENGTH_MARGINS["slightly"]  # adjacent groups: that step
    assert pair_margin(ranking, steps, 3, 1) == STRENGTH_MARGINS["significantly"]
    assert pair_margin(ranking, steps, 1, 4) == STRENGTH_MARGINS["negligibly"]
    assert pair_margin(ranking, steps, 2, 4) == STRENGTH_MARGINS["significantly"]  # the strongest of all three
    table = dict(zip(STRENGTH_MARGINS, [3.0, 2.0, 1.0, 0.0]))  # Llama 2's large-margin table
    assert pair_margin(ranking, steps, 2, 0, table) == 1.0 and pair_margin(ranking, steps, 0, 1, table) == 3.0


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_comparisons(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no comparisons"):
        read_comparisons(tmp_path / "e.jsonl")


def test_docs_describe_every_field():
    """docs/data.md documents exactly the fields the records have."""
    text = DOCS.read_text()
    for cls, heading in ((Comparison, "## Comparison record"), (RankingRecord, "## Ranking record"),
                         (Thumb, "## Thumb record")):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
        assert documented == {f.name for f in fields(cls)}, cls.__name__


GOOD = {"item_id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("encode,needle", [
    (lambda text: text.encode("utf-16"), ":1: not UTF-8 text"),  # byte-order mark 0xff 0xfe first
    (lambda text: text.encode("utf-16-le"), ":1: not UTF-8 text (it holds NUL bytes"),
    (lambda text: text.encode() + b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01\n", ":3: not UTF-8 text"),  # binary on line 3
    (lambda text: text.encode() + "{\"prompt\": \"caf\u00e9\"}\n".encode("latin-1"), ":3: not UTF-8 text (byte 0xe9"),
], ids=["utf-16", "utf-16-le-without-bom", "binary", "latin-1"])
def test_non_utf8_jsonl_names_file_and_line(tmp_path, encode, needle):
    path = tmp_path / "c.jsonl"
    path.write_bytes(encode(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "item_id": "b"}) + "\n"))
    with pytest.raises(DataError) as e:
        read_comparisons(path)
    assert str(e.value).startswith(f"{path}{needle}") and str(e.value).endswith("save it as UTF-8")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-8-sig"))  # as Windows editors save "UTF-8"
    assert read_comparisons(path) == [Comparison("a", "p", "c", "r")]
