"""End to end in Debian's Chromium (Playwright for Python, system browser; no `playwright install`).

The lead signs up from the invitation link, creates the project by uploading completions, invites a
labeler; the labeler signs up, reads the guidelines, ranks by drag-and-drop and by keyboard (move, jump
to a rank, tie), gives strengths and submits; the lead exports, and the export holds that ranking.
Screenshots of the labeling page and the lead's page go to test-artifacts/. And a page served on another
port of the app's host cannot sign the browser in (login CSRF with a planted cookie).

Skips (with the reason) when Playwright or /usr/bin/chromium is missing: scripts/install-browser.sh
installs both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from rlhfkit.data.contract import read_comparisons, read_rankings
from rlhfkit.labelapp import db, project

from .conftest import XSS_IMG, XSS_SCRIPT
from .server import ROOT, Server

CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

COMPLETIONS = [
    {"item_id": "tyre-1", "prompt": "How do I fix a flat bicycle tyre?",
     "completions": [("Take the wheel off, find the hole by pumping the tube up under water, patch it, let the glue "
                      "set, then refit the tube and tyre and pump to the pressure printed on the tyre wall."),
                     "Buy a new bike.",
                     "Patch the tube or replace it; check the tyre for the thorn first, or it will go flat again.",
                     "Tyres are round."],
     "model_ids": ["sft", "ppo", "ppo", "sft"]},
    {"item_id": "hot-2", "prompt": f"My house is too hot {XSS_SCRIPT}",
     "completions": [f"{XSS_IMG} open the windows at night", XSS_SCRIPT, "Close the blinds by day.", "It is not hot."],
     "model_ids": ["sft", "ppo", "ppo", "sft"]},
]


@pytest.fixture(scope="module")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(scripts/install-browser.sh installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: run scripts/install-browser.sh (Debian package chromium)")
    with sync_api.sync_playwright() as p:
        yield p


def rank_by_api(url: str, pdir: Path, name: str) -> None:
    """Another labeler, through the JSON API: ranks every item in its original completion order."""
    import httpx

    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, name)
        project.set_password(conn, name, "bob-password-1", scrypt_n=16)
    with httpx.Client(base_url=url) as http:
        csrf = http.post("/api/session", json={"name": name, "password": "bob-password-1"}).json()["csrf_token"]
        n = 0
        while (a := http.post("/api/next", headers={"X-CSRF-Token": csrf}).json()["assignment"]) is not None:
            with db.opened(pdir) as conn:
                shown = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?",
                                                (a["assignment_id"],)).fetchone()[0])
            display = [[shown.index(i)] for i in range(len(shown))]
            body = {"client_id": f"{name}-{n:04d}-xyz", "assignment_id": a["assignment_id"],
                    "rankings": {"helpfulness": display}, "strengths": {"helpfulness": ["slightly"] * (len(shown) - 1)}}
            assert http.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
            n += 1


def order(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#ranking li", "els => els.map(e => e.dataset.position)")]



def sign_up_and_in(page, invitation: str, name: str, password: str) -> None:
    """Follow an invitation link, choose a password, then sign in with it."""
    page.goto(invitation)
    page.fill("input[name=password]", password)
    page.fill("input[name=password2]", password)
    page.click("button[type=submit]")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")

def test_lead_and_labeler_in_a_real_browser(playwright, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    pdir = tmp_path / "proj"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        lead_token = project.add_person(conn, "lead", "lead")  # what `rlhfkit label serve` prints
    completions_file = tmp_path / "completions.jsonl"
    completions_file.write_text("\n".join(json.dumps(c) for c in COMPLETIONS) + "\n")

    server = Server(pdir).start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    dialogs: list[str] = []
    try:
        # 1. Lead: sign up, sign in, create the project, invite a labeler.
        lead = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        lead.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        sign_up_and_in(lead, f"{server.url}/invite/{lead_token}", "lead", "lead-password-1")
        lead.wait_for_url("**/lead")
        lead.fill("input[name=name]", "courtesy")
        lead.fill("input[name=criteria]", "helpfulness")
        lead.fill("input[name=overlap]", "2")
        lead.check("input[name=ask_strength]")
        lead.set_input_files("input[name=completions]", str(completions_file))
        lead.fill("textarea[name=guidelines]", "# How to rank\n\nPrefer replies that **solve the problem**. "
                  "Flag anything unsafe.")
        lead.click("text=Create project")
        lead.wait_for_selector("text=items complete")
        lead.fill("form[action='/lead/people'] input[name=name]", "alice")
        lead.click("text=Invite")
        link = lead.inner_text("#invite-link").strip()
        assert re.match(rf"{re.escape(server.url)}/invite/\S+$", link)

        # 2. Labeler: sign up from the link, read the guidelines, rank.
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        sign_up_and_in(page, link, "alice", "alice-password-1")
        page.wait_for_url("**/guidelines")
        assert page.locator("strong", has_text="solve the problem").count() == 1
        page.screenshot(path=str(ARTIFACTS / "guidelines-page.png"))
        page.click("#start")
        page.wait_for_selector("#ranking li")
        assert "flat bicycle tyre" in page.inner_text("#prompt-text")
        assert order(page) == [0, 1, 2, 3]

        # drag-and-drop: the last reply onto the first
        page.locator("#ranking li").nth(3).drag_to(page.locator("#ranking li").nth(0),
                                                    target_position={"x": 200, "y": 5})
        assert order(page) == [3, 0, 1, 2]
        # keyboard: move the top reply down one, send the last to rank 1, tie the second with the first
        page.locator("#ranking li").nth(0).focus()
        page.keyboard.press("Shift+ArrowDown")
        assert order(page) == [0, 3, 1, 2]
        page.locator("#ranking li").nth(3).focus()
        page.keyboard.press("1")
        assert order(page) == [2, 0, 3, 1]
        page.locator("#ranking li").nth(1).focus()
        page.keyboard.press("t")
        ranks = page.eval_on_selector_all("#ranking li .rank-no", "els => els.map(e => e.textContent)")
        assert ranks == ["#1", "#1", "#2", "#3"]
        page.select_option(".strength[data-step='0']", "better")
        page.select_option(".strength[data-step='1']", "significantly")
        page.locator("#ranking li").nth(3).locator(".flag").select_option("nonsense")
        page.screenshot(path=str(ARTIFACTS / "labeling-page.png"), full_page=True)
        page.click("#submit")

        # the next item: hostile model text is shown as text, and nothing ran
        page.locator("#prompt-text", has_text="too hot").wait_for()  # (our CSP forbids wait_for_function's eval)
        assert XSS_SCRIPT in page.inner_text("#prompt-text")
        assert page.get_by_text(XSS_SCRIPT, exact=True).count() == 1
        assert page.locator("#ranking img").count() == 0
        page.screenshot(path=str(ARTIFACTS / "labeling-page-hostile-text.png"), full_page=True)
        assert dialogs == []

        # A second labeler works through the JSON API, so the lead page has agreement figures to show.
        rank_by_api(server.url, pdir, "bob")

        # 3. Lead exports; the export holds alice's ranking in original completion indices.
        lead.goto(f"{server.url}/lead")
        lead.click("text=Export comparisons")
        lead.wait_for_selector("#exported")
        lead.screenshot(path=str(ARTIFACTS / "lead-page.png"), full_page=True)
        assert dialogs == []
    finally:
        browser.close()
        server.stop()

    with db.opened(pdir) as conn:
        shown = json.loads(conn.execute(
            "SELECT a.display_order FROM assignments a JOIN items i ON i.id = a.item_id WHERE i.item_key = 'tyre-1'"
        ).fetchone()[0])
    expected = [sorted(shown[p] for p in group) for group in ([2, 0], [3], [1])]
    export_dir = max((pdir / "exports").iterdir())
    rankings = read_rankings(export_dir / "rankings.jsonl")
    assert [(r.item_id, r.ranking) for r in rankings if r.labeler_id == "alice"] == [("tyre-1", expected)]
    assert {(r.item_id, r.labeler_id) for r in rankings} == {("tyre-1", "alice"), ("tyre-1", "bob"), ("hot-2", "bob")}
    # comparisons: pairwise majority of alice and bob; every one alice supports follows her ranking and
    # carries her strengths ("better" between ranks 1 and 2, "significantly" from rank 2 on)
    texts = rankings[0].completions
    rank_of = {i: g for g, group in enumerate(expected) for i in group}
    for c in read_comparisons(export_dir / "comparisons.jsonl"):
        if c.item_id == "tyre-1" and "alice" in c.labeler_ids:
            better, worse = texts.index(c.chosen), texts.index(c.rejected)
            assert rank_of[better] < rank_of[worse]


def test_two_criteria_skip_and_keyboard_only(playwright, tmp_path):
    from .conftest import PASSWORD, make_project

    ARTIFACTS.mkdir(exist_ok=True)
    pdir = make_project(tmp_path / "p", n_items=2, overlap=1, criteria=("helpfulness", "harmlessness"), people=("alice",))
    server = Server(pdir).start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    try:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{server.url}/login")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.click("#start")
        first = page.inner_text("#prompt-text")
        page.click("#skip")
        page.locator("#prompt-text", has_text="prompt number 1").wait_for()
        assert page.inner_text("#prompt-text") != first

        page.locator("body").focus()
        page.keyboard.press("ArrowDown")  # selects the first reply
        page.keyboard.press("Shift+ArrowDown")
        assert order(page) == [1, 0, 2]
        page.keyboard.press("Control+Enter")  # refused: harmlessness not ranked yet
        assert "harmlessness" in page.inner_text("#status")
        page.keyboard.press("]")
        assert order(page) == [0, 1, 2]  # each criterion starts from the shown order
        page.locator("#ranking li").nth(2).focus()
        page.keyboard.press("1")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("t")
        assert order(page) == [2, 0, 1]
        page.screenshot(path=str(ARTIFACTS / "labeling-page-two-criteria.png"), full_page=True)
        page.keyboard.press("[")
        assert order(page) == [1, 0, 2]  # helpfulness kept its order
        page.keyboard.press("Control+Enter")
        page.locator("text=All done").wait_for()
    finally:
        browser.close()
        server.stop()
    with db.opened(pdir) as conn:
        row = conn.execute("SELECT s.rankings, a.display_order FROM submissions s JOIN assignments a ON a.id = s.assignment_id").fetchone()
        statuses = sorted(r[0] for r in conn.execute("SELECT status FROM assignments"))
    shown = json.loads(row["display_order"])
    assert json.loads(row["rankings"]) == {
        "helpfulness": [[shown[1]], [shown[0]], [shown[2]]],
        "harmlessness": [sorted([shown[2], shown[0]]), [shown[1]]],
    }
    assert statuses == ["skipped", "submitted"]


def test_a_page_on_another_port_cannot_sign_the_browser_in(playwright, tmp_path):
    """Login CSRF across ports: cookies ignore ports, so a page served on another port of the app's host
    plants the sign-in form's cookie and posts the form with the matching token and the attacker's own
    account (the victim would then label as the attacker). The browser's Origin gives it away."""
    import functools
    import http.server
    import threading

    from rlhfkit.labelapp.deps import cookie_names

    from .conftest import PASSWORD, make_project
    from .server import free_port

    pdir = make_project(tmp_path / "p", n_items=1, people=("mallory",))
    server = Server(pdir).start()
    site = tmp_path / "attacker"
    site.mkdir()
    (site / "index.html").write_text(
        f'<form id="f" method="post" action="{server.url}/login"><input name="name" value="mallory">'
        f'<input name="password" value="{PASSWORD}"><input name="csrf_token" value="planted-token"></form>'
        f'<script>document.cookie = "{cookie_names(pdir, False).login_csrf}=planted-token; path=/";'
        'document.getElementById("f").submit();</script>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/index.html")
        page.locator("text=another site").wait_for()
        assert not [c for c in context.cookies() if "session" in c["name"]]  # not signed in as mallory
    finally:
        browser.close()
        attacker.shutdown()
        server.stop()


def test_thumbs_by_keyboard_and_without_javascript(playwright, tmp_path):
    """A thumbs project: one item judged by keyboard only (U / D / + / -, [ ] between criteria, Ctrl+Enter),
    then in a browser with JavaScript off one skipped and one judged by clicking (the page is a plain form)."""
    from .conftest import PASSWORD, make_project

    ARTIFACTS.mkdir(exist_ok=True)
    pdir = make_project(tmp_path / "p", n_items=3, overlap=1, criteria=("helpfulness", "harmlessness"),
                        people=("alice",), mode="thumbs")
    server = Server(pdir).start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)

    def sign_in(context):
        page = context.new_page()
        page.goto(f"{server.url}/login")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.click("#start")
        return page

    try:
        page = sign_in(browser.new_context(viewport={"width": 1280, "height": 900}))
        first = page.inner_text("#prompt-text")
        page.locator("body").focus()
        page.keyboard.press("ArrowDown")  # selects the first reply
        for key in ("u", "d", "+"):  # each thumb moves on to the next reply
            page.keyboard.press(key)
        assert "3 replies still need a thumb" in page.inner_text("#status")  # harmlessness not given yet
        page.keyboard.press("Control+Enter")  # refused by the form: every thumb is required
        assert page.inner_text("#prompt-text") == first
        page.keyboard.press("]")
        page.locator("#replies li").nth(0).focus()
        for key in ("-", "D", "U"):
            page.keyboard.press(key)
        assert "Every reply has its thumb" in page.inner_text("#status")
        page.screenshot(path=str(ARTIFACTS / "thumbs-page.png"), full_page=True)
        page.keyboard.press("Control+Enter")
        page.locator("#prompt-text", has_text="prompt number 1").wait_for()

        plain = sign_in(browser.new_context(java_script_enabled=False))
        assert "prompt number 1" in plain.inner_text("#prompt-text")  # the open item, resumed
        plain.click("#skip")  # no thumb given: skipping needs none
        assert "prompt number 2" in plain.inner_text("#prompt-text")
        for c, labels in (("helpfulness", ("down", "down", "up")), ("harmlessness", ("up", "up", "up"))):
            for pos, value in enumerate(labels):
                plain.click(f'label[for="t-{c}-{pos}-{value}"]')
        plain.click("#submit")
        plain.locator("text=All done").wait_for()
    finally:
        browser.close()
        server.stop()
    with db.opened(pdir) as conn:
        rows = conn.execute("SELECT s.thumbs, a.display_order FROM submissions s"
                            " JOIN assignments a ON a.id = s.assignment_id ORDER BY s.id").fetchall()
        statuses = [r[0] for r in conn.execute("SELECT status FROM assignments ORDER BY id")]
    assert statuses == ["submitted", "skipped", "submitted"]
    given = [{"helpfulness": [True, False, True], "harmlessness": [False, False, True]},
             {"helpfulness": [False, False, True], "harmlessness": [True, True, True]}]  # by display position
    for row, labels in zip(rows, given, strict=True):
        shown = json.loads(row["display_order"])
        assert json.loads(row["thumbs"]) == {c: [ls[shown.index(i)] for i in range(3)] for c, ls in labels.items()}
