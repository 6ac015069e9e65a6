"""Thumbs up/down (the Thumb record): formats, conversion, load_thumbs' split and its errors (file, line, field)."""

import json

import pytest

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import Comparison, Thumb, read_thumbs, write_jsonl
from rlhfkit.data.load import convert_file, load_thumb_records, read_data, save_records
from rlhfkit.data.preferences import load_thumbs
from rlhfkit.data.splits import is_heldout


class _Tok:
    """A tokenizer that represents every text (check_representable asks for unk_token_id / encode)."""

    unk_token_id = None

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[1] for _ in texts]}

    def encode(self, text, **kwargs):
        return [1]


def _thumbs(n_items=40, per_item=2):
    return [Thumb(f"i{i}", f"p{i}", f"c{i}-{j}", (i + j) % 2 == 0, f"sim-{j}") for i in range(n_items) for j in range(per_item)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_contract_roundtrip_and_detection(tmp_path):
    records = _thumbs(3)
    write_jsonl(tmp_path / "t.jsonl", records)
    assert read_thumbs(tmp_path / "t.jsonl") == records
    data = read_data(tmp_path / "t.jsonl")
    assert (data.format, data.kind, data.records) == ("thumbs", "thumbs", records)


def test_trl_unpaired_text_and_conversational(tmp_path):
    conv = [{"role": "user", "content": "Sky?"}]
    path = _write(tmp_path / "u.jsonl", [{"prompt": "The sky is", "completion": " blue.", "label": True},
                                         {"prompt": conv, "completion": [{"role": "assistant", "content": "Green."}],
                                          "label": False}])
    data = read_data(path)
    assert data.format == "trl-unpaired"
    up, down = data.records
    assert (up.prompt, up.completion, up.label, up.labeler_id, up.criterion) == ("The sky is", " blue.", True, "", "overall")
    assert down.label is False and down.prompt == conv and up.item_id.startswith("p")
    # written back in TRL's shape (no derived fields), read again: the same records
    save_records(tmp_path / "back.jsonl", data.records, "trl-unpaired")
    rows = [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt": "The sky is", "completion": " blue.", "label": True}
    assert load_thumb_records(tmp_path / "back.jsonl") == data.records


def test_data_convert_between_thumb_formats_and_from_pairs(tmp_path):
    path = _write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "a", "label": True, "labeler_id": "ann"}])
    r = convert_file(path, tmp_path / "c.jsonl")  # to the contract
    assert (r["format"], r["kind"], r["to_format"]) == ("trl-unpaired", "thumbs", "thumbs")
    assert read_thumbs(tmp_path / "c.jsonl")[0].labeler_id == "ann"
    write_jsonl(tmp_path / "pairs.jsonl", [Comparison("a", "p", "good", "bad", labeler_ids=["sim-1"])])
    convert_file(tmp_path / "pairs.jsonl", tmp_path / "t.jsonl", to_fmt="trl-unpaired")
    assert [(t.completion, t.label) for t in load_thumb_records(tmp_path / "t.jsonl")] == [("good", True), ("bad", False)]
    with pytest.raises(DataError, match="thumbs .* cannot be written as 'trl', which holds preference pairs"):
        save_records(tmp_path / "x.jsonl", read_thumbs(tmp_path / "c.jsonl"), "trl")


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "completion": "c", "label": "false"}, "field 'label' must be a JSON boolean, true (thumbs up) or "
                                                           "false (thumbs down); got str 'false'"),
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label' must be a JSON boolean"),
    ({"prompt": "p", "completion": "c", "label": 0.3}, "got float 0.3"),
    ({"prompt": "p", "label": True}, "missing field 'completion'"),
    ({"item_id": "a", "prompt": "p", "label": False}, "missing field 'completion'"),
    ({"prompt": "p", "completion": 3, "label": True}, "field 'completion' must be a string"),
])
def test_bad_thumbs_name_file_line_and_field(tmp_path, row, needle):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "r", "label": True}, row])
    with pytest.raises(DataError) as e:
        load_thumbs(path, "", 0.1, 0, _Tok())
    assert f"{path}:2" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("label,kind", [(True, "up"), (False, "down")])
def test_one_kind_of_thumb_cannot_teach_kto(tmp_path, label, kind):
    records = [Thumb(f"i{i}", "p", f"c{i}", label) for i in range(30)]
    write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.raises(DataError, match=rf"all 30 thumbs of the file are {kind} .*cannot learn from one kind"):
        load_thumbs(tmp_path / "t.jsonl", "", 0.1, 0, _Tok())


def test_load_thumbs_splits_by_item_like_comparisons(tmp_path):
    records = _thumbs(60)
    write_jsonl(tmp_path / "t.jsonl", records)
    train, test = load_thumbs(tmp_path / "t.jsonl", "", 0.2, 3, _Tok())
    assert len(train) + len(test) == len(records) and test
    assert not {t.item_id for t in train} & {t.item_id for t in test}  # an item is on one side, all its thumbs with it
    assert all(is_heldout(t.item_id, 0.2, 3) for t in test) and not any(is_heldout(t.item_id, 0.2, 3) for t in train)
    assert load_thumbs(tmp_path / "t.jsonl", "", 0.2, 3, _Tok()) == (train, test)  # same seed: same split


def test_load_thumbs_reads_pairs_and_one_criterion(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [Comparison(f"i{i}", "p", "good", "bad") for i in range(30)])
    train, _ = load_thumbs(tmp_path / "c.jsonl", "", 0.1, 0, _Tok())
    assert {(t.completion, t.label) for t in train} == {("good", True), ("bad", False)}
    mixed = _thumbs(30) + [Thumb("x", "p", "c", True, criterion="harmlessness")]
    write_jsonl(tmp_path / "m.jsonl", mixed)
    with pytest.raises(DataError, match="criteria"):
        load_thumbs(tmp_path / "m.jsonl", "", 0.1, 0, _Tok())
    train, test = load_thumbs(tmp_path / "m.jsonl", "overall", 0.1, 0, _Tok())
    assert len(train) + len(test) == 60


def test_a_prompt_file_is_not_thumbs(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match="learns from thumbs up/down"):
        load_thumbs(path, "", 0.1, 0, _Tok())
