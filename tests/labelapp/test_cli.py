"""`rlhfkit label ...` commands, and the clear errors they give."""

from __future__ import annotations

import io
import json
import sys

import pytest

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import read_comparisons
from rlhfkit.labelapp import db
from rlhfkit.labelapp.cli import main

from .conftest import make_items


def write_completions(path, n=3):
    path.write_text("\n".join(json.dumps(i) for i in make_items(n)) + "\n")
    return path


def test_create_add_status_export(tmp_path, capsys, monkeypatch):
    pdir = tmp_path / "proj"
    guide = tmp_path / "guide.md"
    guide.write_text("# Be kind")
    comp = write_completions(tmp_path / "c.jsonl")
    assert main(["create", str(pdir), "--completions", str(comp), "--overlap", "2", "--criteria",
                 "helpfulness,harmlessness", "--strength", "--guidelines", str(guide)]) == 0
    assert "created" in capsys.readouterr().out
    assert main(["add-labeler", str(pdir), "alice", "--base-url", "http://127.0.0.1:9000"]) == 0
    assert "http://127.0.0.1:9000/invite/" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert main(["add-labeler", str(pdir), "boss", "--lead", "--password-stdin"]) == 0
    with db.opened(pdir) as conn:
        roles = dict(conn.execute("SELECT name, role FROM users").fetchall())
        assert roles == {"alice": "labeler", "boss": "lead"}
        assert conn.execute("SELECT guidelines FROM project").fetchone()[0] == "# Be kind"
    assert main(["status", str(pdir)]) == 0
    assert "0/3 items complete" in capsys.readouterr().out
    assert main(["export", str(pdir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "export.json").is_file()


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["only one"]}\n')
    assert main(["create", str(tmp_path / "p"), "--completions", str(bad)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err
    assert main(["create", str(tmp_path / "p"), "--completions", str(bad), "--policy", "x"]) == 2
    assert "exactly one of --completions" in capsys.readouterr().err
    assert main(["create", str(tmp_path / "p2"), "--completions", str(write_completions(tmp_path / "ok.jsonl")),
                 "--criteria", "Bad Name"]) == 2
    assert "criteria" in capsys.readouterr().err
    assert main(["create", str(tmp_path / "p3"), "--policy", str(tmp_path / "nope"), "--prompts",
                 str(write_completions(tmp_path / "pr.jsonl"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no labeling project" in capsys.readouterr().err
    assert main(["add-labeler", str(tmp_path / "p2x"), "bad name!"]) == 2
    assert "name" in capsys.readouterr().err


def test_create_twice_is_refused(tmp_path, capsys):
    comp = write_completions(tmp_path / "c.jsonl")
    assert main(["create", str(tmp_path / "p"), "--completions", str(comp)]) == 0
    assert main(["create", str(tmp_path / "p"), "--completions", str(comp)]) == 2
    assert "already holds a labeling project" in capsys.readouterr().err


def test_export_of_labels_reads_back(tmp_path):
    # export with no labels yet writes an empty comparisons file the trainer rejects with a clear message
    comp = write_completions(tmp_path / "c.jsonl")
    main(["create", str(tmp_path / "p"), "--completions", str(comp)])
    main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match="no comparisons"):
        read_comparisons(tmp_path / "o" / "comparisons.jsonl")


def test_serve_without_the_app_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import fails like a missing package
    assert main(["serve", str(tmp_path / "p")]) == 2
    assert "pip install 'rlhfkit[app]'" in capsys.readouterr().err


def test_serve_prints_a_lead_sign_up_link_only_when_there_is_no_lead(tmp_path):
    from rlhfkit.labelapp.cli import lead_invitation_if_needed

    db.init_db(db.db_path(tmp_path / "p"))
    link = lead_invitation_if_needed(tmp_path / "p", "http://127.0.0.1:8000")
    assert link.startswith("http://127.0.0.1:8000/invite/")
    # a second start must not invalidate the link already sent
    assert lead_invitation_if_needed(tmp_path / "p", "http://127.0.0.1:8000") is None


def test_re_inviting_a_lead_keeps_the_role(tmp_path, capsys):
    pdir = tmp_path / "p"
    assert main(["add-labeler", str(pdir), "boss", "--lead"]) == 0
    assert main(["add-labeler", str(pdir), "boss"]) == 0  # a password reset, not a demotion
    assert "lead boss" in capsys.readouterr().out
    with db.opened(pdir) as conn:
        assert conn.execute("SELECT role FROM users WHERE name = 'boss'").fetchone()[0] == "lead"


# -- inputs a user can get wrong: one line on stderr, exit 2, never a traceback -------------------------

NOT_UTF8 = "caf\xe9".encode("latin-1")  # Latin-1 bytes: not valid UTF-8


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_files_that_are_not_utf8_are_one_line_errors(tmp_path, capsys):
    comp = tmp_path / "c.jsonl"
    comp.write_bytes(b'{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "' + NOT_UTF8 + b'", "completions": ["a", "b"]}\n')
    assert main(["create", str(tmp_path / "p1"), "--completions", str(comp)]) == 2
    err = one_error_line(capsys)
    assert f"{comp}:2" in err and "UTF-8" in err
    good = write_completions(tmp_path / "ok.jsonl")
    guide = tmp_path / "guide.md"
    guide.write_bytes(b"# Rank " + NOT_UTF8)
    assert main(["create", str(tmp_path / "p2"), "--completions", str(good), "--guidelines", str(guide)]) == 2
    assert "UTF-8" in one_error_line(capsys)
    for name in ("prompts.txt", "prompts.jsonl"):
        prompts = tmp_path / name
        prompts.write_bytes(b'{"prompt": "' + NOT_UTF8 + b'"}\n' if name.endswith("jsonl") else NOT_UTF8 + b"\n")
        assert main(["create", str(tmp_path / "p3"), "--policy", str(tmp_path), "--prompts", str(prompts)]) == 2
        assert f"{prompts}:1" in one_error_line(capsys)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_bytes(b'{"model_type": "' + NOT_UTF8 + b'"}')
    (tmp_path / "ok.txt").write_text("hello\n")
    assert main(["create", str(tmp_path / "p4"), "--policy", str(policy), "--prompts", str(tmp_path / "ok.txt")]) == 2
    assert "config.json" in one_error_line(capsys)
    assert not (tmp_path / "p1" / "labels.sqlite3").exists()


@pytest.mark.parametrize("minutes", ["nan", "-5", "0", "inf"])
def test_lease_minutes_must_be_a_positive_number(tmp_path, capsys, minutes):
    comp = write_completions(tmp_path / "c.jsonl")
    assert main(["create", str(tmp_path / "p"), "--completions", str(comp), f"--lease-minutes={minutes}"]) == 2
    assert "--lease-minutes" in one_error_line(capsys)


def test_a_project_path_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    comp = write_completions(tmp_path / "c.jsonl")
    afile = tmp_path / "notes.txt"
    afile.write_text("not a directory")
    assert main(["create", str(afile), "--completions", str(comp)]) == 2
    assert "not a directory" in one_error_line(capsys)
    assert main(["add-labeler", str(afile), "alice"]) == 2
    assert "not a directory" in one_error_line(capsys)
    assert main(["serve", str(afile)]) == 2
    assert "not a directory" in one_error_line(capsys)
    assert afile.read_text() == "not a directory"


def test_an_export_target_that_exists_is_refused_unless_it_holds_an_export(tmp_path, capsys):
    comp = write_completions(tmp_path / "c.jsonl")
    assert main(["create", str(tmp_path / "p"), "--completions", str(comp)]) == 0
    afile = tmp_path / "out.txt"
    afile.write_text("keep me")
    assert main(["export", str(tmp_path / "p"), "--out", str(afile)]) == 2
    assert "not a directory" in one_error_line(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.md").write_text("keep me")
    assert main(["export", str(tmp_path / "p"), "--out", str(busy)]) == 2
    assert "notes.md" in one_error_line(capsys)
    assert afile.read_text() == (busy / "notes.md").read_text() == "keep me"
    # a previous export is replaced
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 0
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 0


def test_create_from_a_policy_samples_with_the_filters_asked_for(tmp_path, capsys, monkeypatch):
    """`create --policy` draws with the pipeline's [sampling] filters: each flag given, else the policy's
    generation_config.json (as `rlhfkit run` with policy.path), else off; a value out of range is a clear error
    naming the flag (or the file it came from)."""
    from rlhfkit.labelapp import project
    from rlhfkit.models.sampling import SamplingParams

    seen = {}

    def fake_sample_items(policy_dir, prompts, k, **kwargs):
        seen.update(kwargs)
        return [{"prompt": p, "completions": [f"a{i}" for i in range(k)], "model_ids": ["m"] * k, "item_id": None}
                for p in prompts]

    monkeypatch.setattr(project, "sample_items", fake_sample_items)
    policy, prompts = tmp_path / "policy", tmp_path / "prompts.txt"
    policy.mkdir()
    (policy / "generation_config.json").write_text(json.dumps({"top_p": 0.9, "repetition_penalty": 1.2,
                                                               "temperature": 0.6}))
    prompts.write_text("hello\nhow are you\n")
    assert main(["create", str(tmp_path / "p1"), "--policy", str(policy), "--prompts", str(prompts),
                 "--top-k", "5", "--stop", "\n\n", "--temperature", "0.8"]) == 0
    assert seen["sampling"] == SamplingParams(top_k=5, top_p=0.9, min_p=0.0, repetition_penalty=1.2, stop=("\n\n",))
    assert seen["temperature"] == 0.8  # the file's temperature is for answering, not taken (as in the pipeline)
    assert main(["create", str(tmp_path / "p2"), "--policy", str(policy), "--prompts", str(prompts),
                 "--top-p", "1.5"]) == 2
    assert "--top-p 1.5: give a value in (0, 1]" in one_error_line(capsys)
    (policy / "generation_config.json").write_text(json.dumps({"min_p": 2}))
    assert main(["create", str(tmp_path / "p3"), "--policy", str(policy), "--prompts", str(prompts)]) == 2
    assert "--min-p 2 (from " in one_error_line(capsys)
    (policy / "generation_config.json").unlink()
    assert main(["create", str(tmp_path / "p4"), "--policy", str(policy), "--prompts", str(prompts)]) == 0
    assert seen["sampling"] == SamplingParams() and seen["temperature"] == 1.0  # nothing set: every filter off
