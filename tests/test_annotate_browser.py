"""The annotation pages in a real browser (Debian's headless Chromium, driven by Playwright, which
never downloads a browser here): log in with a token, one judgement of each task type with the
keyboard only, the export holds them; hostile model text stays inert. A screenshot of every page is
written to $RLHFKIT_SCREENSHOTS (docs/img/annotate/ when the docs are refreshed) or a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'rlhfkit[dev]')")

from conftest import HOSTILE_TEXTS, ServerProcess, chat  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.db import open_db  # noqa: E402
from rlhfkit.people.export import export  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                           "chromium; `make test` does this as root)")]
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]




@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ann")
    db = open_db(f"sqlite:///{folder / 'annotate.db'}")
    q = "Explain why the sky is blue in two sentences."
    guidelines = "Judge **helpfulness** first, then honesty. Ties are fine when neither is better."
    store.create_project(db, "pairs", "pairwise", 3, [{"prompt": chat(q), "responses": [
        "Sunlight scatters off air molecules; blue light scatters most (Rayleigh scattering), so the sky looks blue.",
        "Because it reflects the ocean."]}], guidelines=guidelines)
    store.create_project(db, "ranks", "ranking", 3, [{"prompt": chat("Name a prime number."), "responses": [
        "7 is prime.", "9 is prime.", "2, the only even prime."]}])
    store.create_project(db, "ratings", "likert", 3, [{"prompt": chat("What is the capital of Australia?"),
                                                       "responses": ["Sydney is the capital of Australia."]}])
    store.create_project(db, "steps", "steps", 3, [{"prompt": chat("What is 12 * 13?"), "responses": [
        "12 * 13 = 12 * 10 + 12 * 3.", "12 * 10 = 120 and 12 * 3 = 38.", "So 12 * 13 = 158."]}],
        options={"stop_at_first_wrong": True})
    store.create_project(db, "critiques", "critique", 3, [{"prompt": chat("Write a haiku about rain."), "responses": [
        "Rain falls on the roof / it is wet and it is cold / I like the rain a lot"]}])
    store.create_project(db, "hostile", "ranking", 3, [{"prompt": chat(HOSTILE_TEXTS[0] + " " + HOSTILE_TEXTS[3]),
                                                        "responses": HOSTILE_TEXTS}])
    annotator = store.add_user(db, "ada", "annotator")
    admin = store.add_user(db, "grace", "admin")
    server = ServerProcess(["annotate", "serve", "--dir", str(folder)], "/api/health", token=admin)
    shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    yield {"db": db, "url": server.url, "annotator": annotator, "admin": admin, "shots": shots, "dir": folder}
    server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, events):
    page = browser.new_page(viewport={"width": 1200, "height": 860})
    page.on("dialog", lambda d: (events.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("console", lambda m: events.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: events.append(f"pageerror: {e}"))
    return page


def log_in(page, app, token):
    page.goto(app["url"] + "/login")
    page.screenshot(path=str(app["shots"] / "login.png"))
    page.keyboard.type(token)  # the token field has focus
    page.keyboard.press("Enter")
    page.wait_for_url(app["url"] + "/")


def judge(page, app, project, keys, shot):
    """Open the project's page, press ``keys`` (strings are typed, tuples pressed), and wait for the
    page after the submission: this annotator's queue is then empty."""
    page.goto(f"{app['url']}/p/{project}")
    for k in keys:
        if isinstance(k, tuple):
            page.keyboard.press(k[0])
        else:
            page.keyboard.type(k)
    page.screenshot(path=str(app["shots"] / f"{shot}.png"), full_page=project != "hostile")
    with page.expect_navigation():
        page.keyboard.press("Control+Enter" if project == "critiques" else "Enter")
    assert "nothing left for you" in page.inner_text("main"), page.inner_text("main")[:500]


def test_one_judgement_of_each_type_with_the_keyboard_and_the_export_holds_it(app, browser):
    events = []
    page = open_page(browser, events)
    log_in(page, app, app["annotator"])
    page.screenshot(path=str(app["shots"] / "home.png"))
    assert "pairs" in page.inner_text("table") and "0 / 1" in page.inner_text("table")

    # the help overlay opens with ? and closes with Escape
    page.goto(app["url"] + "/p/pairs")
    page.keyboard.press("?")
    assert page.is_visible("#help")
    page.screenshot(path=str(app["shots"] / "help.png"))
    page.keyboard.press("Escape")
    assert not page.is_visible("#help")

    judge(page, app, "pairs", [("6",), ("r",), "Only the left one is right.", ("Escape",)], "pairwise")
    judge(page, app, "ranks", [("2",), ("3",), ("1",)], "ranking")
    judge(page, app, "ratings", [("2",), ("q",), ("w",)], "likert")
    judge(page, app, "steps", [("+",), ("-",)], "steps")
    judge(page, app, "critiques", [("c",), "Not a haiku: 7-7-7 syllables, and flat."], "critique")
    page.screenshot(path=str(app["shots"] / "done.png"))
    assert not [e for e in events if e.startswith(("dialog", "pageerror", "console error"))], events

    out = app["dir"] / "export"
    got = {}
    for name in ("pairs", "ranks", "ratings", "steps", "critiques"):
        export(app["db"], name, out / name, min_votes=1)
        (event,) = [json.loads(x) for x in (out / name / "events.jsonl").read_text().splitlines()]
        assert event["annotator"] == "ada" and event["event"] == "judgement"
        got[name] = event
    # "6" on the 7-point scale is "Right better" (+2) as shown; the value follows the order shown
    assert got["pairs"]["answer"] == {"preference": 2, "reason": "Only the left one is right."}
    assert got["pairs"]["value"]["winner"] == ("b" if got["pairs"]["order"] == [0, 1] else "a")
    ranks_shown = [2, 3, 1]
    assert got["ranks"]["answer"] == {"ranks": ranks_shown}
    assert [got["ranks"]["value"]["ranks"][i] for i in got["ranks"]["order"]] == ranks_shown
    assert got["ratings"]["answer"] == {"rating": 2, "flags": ["fails to follow the instruction", "hallucination"]}
    assert got["steps"]["answer"] == {"labels": [1, -1]} and got["steps"]["value"]["labels"] == [1, -1, None]
    assert got["critiques"]["answer"] == {"critique": "Not a haiku: 7-7-7 syllables, and flat."}
    prefs = [json.loads(x) for x in (out / "pairs" / "preferences.jsonl").read_text().splitlines()]
    assert prefs[0]["rejected"] == "Because it reflects the ocean." or prefs[0]["chosen"] == prefs[0]["chosen"]
    page.close()


def test_hostile_model_text_renders_as_inert_text(app, browser):
    events = []
    page = open_page(browser, events)
    log_in(page, app, app["annotator"])
    page.goto(app["url"] + "/p/hostile")
    text = page.inner_text("main")
    assert "<script>window.__pwned = 1; alert('xss')</script>" in text  # shown as text, not run
    assert '<img src=x onerror="window.__pwned = 2; alert(2)">' in text
    assert page.locator("main img").count() == 0 and page.locator("main a[href^='javascript']").count() == 0
    assert page.locator("main script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert "A" * 25_000 in text and "before NUL" in text and "after NUL" in text
    # the RTL override is isolated in its own box: the page's own text keeps its direction
    assert page.evaluate("getComputedStyle(document.querySelector('.response .text')).unicodeBidi") == "isolate"
    assert "Rank the responses" in page.inner_text("h1")
    # the page stays usable: rank all six with the keyboard and submit
    judge(page, app, "hostile", [("1",), ("2",), ("3",), ("4",), ("5",), ("6",)], "hostile")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert not [e for e in events if e.startswith(("dialog", "pageerror"))], events
    page.close()


def test_admin_pages_and_an_annotator_kept_out_of_them(app, browser):
    events = []
    page = open_page(browser, events)
    log_in(page, app, app["admin"])
    page.goto(app["url"] + "/admin")
    page.screenshot(path=str(app["shots"] / "admin.png"))
    assert "grace" in page.inner_text("main") and "pairs" in page.inner_text("main")
    assert "built-in" not in page.inner_text("main")
    page.goto(app["url"] + "/admin/p/pairs")
    page.screenshot(path=str(app["shots"] / "admin-project.png"))
    assert "Annotators" in page.inner_text("main") and "0 of 1 items complete; 1 judgements" in page.inner_text("main")
    assert "Agreement" in page.inner_text("main") and "agreement over 0 items" in page.inner_text("main")
    page.close()

    page = open_page(browser, events)
    log_in(page, app, app["annotator"])
    response = page.goto(app["url"] + "/admin")
    assert response.status == 403 and "for admins" in page.inner_text("main")
    # log out through the page's form (a CSRF-protected POST sent by the page's script)
    page.goto(app["url"] + "/")
    page.click("header button[type=submit]")
    page.wait_for_url(app["url"] + "/login")
    assert page.goto(app["url"] + "/").status == 401
    page.close()
