"""Blind human A/B evaluation: simulated annotators who prefer the policy's answer with a known
probability judge through the HTTP API; the reported win rate's interval covers that probability, the
left/right order is balanced, and the evaluation's report shows it (checked in headless Chromium)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'rlhfkit[dev]')")

from conftest import ServerProcess  # noqa: E402
from rlhfkit.cli import main  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.db import open_db  # noqa: E402

P_POLICY = 0.75  # each simulated annotator prefers the policy's answer with this probability
N = 40


def eval_run(folder):
    """An `eval policy` run directory as that stage leaves it: eval.json with one sample per held-out
    prompt. The reward model prefers the policy on 30 of 40 prompts, the gold metric on 20, and the judge
    on 10 (tie on 5)."""
    folder.mkdir(parents=True)
    samples = [{"prompt": f"Held-out question {i}?", "policy": f"The policy's answer to question {i}.",
                "reference": f"Reference reply {i}.",
                "reward_policy": 1.0, "reward_reference": 0.5, "gold_policy": 0.0, "gold_reference": 0.5,
                "judge": "policy" if i < 10 else "tie" if i < 15 else "reference"} for i in range(N)]
    rewards = {"reward": {"policy": 0.75, "reference": 0.5, "difference": 0.25, "difference_se": 0.07,
                          "difference_in_se": 3.6, "win_rate": 0.75}}
    (folder / "eval.json").write_text(json.dumps({"prompts": N, "temperature": 0.7, "kl": 1.2, "kl_se": 0.1,
                                                  "rewards": rewards, "samples": samples}))
    (folder / "manifest.json").write_text(json.dumps({"stage": "eval-policy", "status": "finished"}))
    return samples


@pytest.mark.slow
def test_blind_human_ab_reports_a_win_rate_whose_interval_covers_the_truth(tmp_path, capsys):
    samples = eval_run(tmp_path / "eval")
    side = {s["policy"]: "policy" for s in samples} | {s["reference"]: "reference" for s in samples}
    folder = tmp_path / "ann"
    args = ["annotate", "ab", "--eval-run", str(tmp_path / "eval"), "--dir", str(folder), "--output-dir",
            str(tmp_path / "runs"), "--name", "ab", "--no-progress"]
    main(args)  # the project is made; the stage waits for people
    assert "waiting for people" in capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "ab" / "manifest.json").read_text())["status"] == "waiting"

    db = open_db(f"sqlite:///{folder / 'annotate.db'}")
    tokens = [store.add_user(db, f"ann{i}") for i in range(3)]
    server = ServerProcess(["annotate", "serve", "--dir", str(folder)], "/api/health", token=tokens[0])
    rng = random.Random(0)
    try:
        for token in tokens:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
                while (item := c.post("/api/projects/ab/next").json()["item"]) is not None:
                    shown = [side[t] for t in item["responses"]]
                    assert sorted(shown) == ["policy", "reference"]  # one of each, and nothing else says which
                    want = "policy" if rng.random() < P_POLICY else "reference"
                    r = c.post(f"/api/projects/ab/items/{item['item']}/judgement",
                               json={"preference": -1 if shown[0] == want else 1})
                    assert r.status_code == 201
    finally:
        server.kill()

    main(args)
    human = json.loads((tmp_path / "eval" / "eval.json").read_text())["human"]
    assert human["items"] == N and human["judgements"] == 3 * N
    low, high = human["win_rate_ci95"]
    assert low <= P_POLICY <= high and high - low < 0.3, human
    assert abs(human["policy_shown_left"] - 0.5) < 0.15  # the order was randomised per annotator
    # the RM always picks the policy and gold always the reference: the people's majority (3 votes, never
    # a tie) agrees with exactly one of them on every item, with the RM on the items where most chose the
    # policy: P = 0.75^3 + 3 (0.75^2)(0.25) = 0.84 in expectation
    vs = human["people_vs"]
    assert vs["reward"]["items"] == vs["gold"]["items"] == N
    assert vs["reward"]["agreement"] + vs["gold"]["agreement"] == pytest.approx(1.0)
    assert 0.6 < vs["reward"]["agreement"] and vs["judge"]["items"] == 35  # the judge's 5 ties are left out
    assert human["people"]["percent_agreement"] is not None

    report = tmp_path / "eval" / "report.html"
    html = report.read_text()
    assert "Human evaluation (blind A/B)" in html and "Agreement between the people" in html
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: the report's screenshot is not checked")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless=new", "--no-sandbox", "--disable-gpu",
                                                                      "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        text = page.inner_text("body")
        assert f"Policy win rate (ties count half): {human['win_rate']:.3f}" in text
        assert "percent agreement" in text and "people's majority vs reward" in text
        shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "report-human-ab.png"), full_page=True)
        browser.close()


def test_eval_policy_human_evaluates_once_then_waits_for_people_then_reports(tmp_path, capsys):
    """`eval policy --human --name ev`: the evaluation, then a blind project of its answers, waiting; the
    same command again does not evaluate again and, once people have judged, writes eval.json's human."""
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say something about {w}."} for w in "abcd"])
    rule = tmp_path / "gold.yaml"
    rule.write_text("max_words: 4\nname: gold\n")
    args = ["eval", "policy", "--model", "tiny", "--reference", "tiny", "--eval", str(prompts), "--reward",
            f"rule:{rule}", "--max-new-tokens", "6", "--output-dir", str(tmp_path / "runs"), "--name", "ev",
            "--no-progress", "--human", "--human-overlap", "2"]
    main(args)
    assert "waiting for people" in capsys.readouterr().err
    eval_json = tmp_path / "runs" / "ev" / "eval.json"
    first = eval_json.stat().st_mtime_ns
    db = open_db(f"sqlite:///{tmp_path / 'runs' / 'annotations' / 'annotate.db'}")
    for name in ("a", "b"):
        user = store.user_for_token(db, store.add_user(db, name))
        while (item := store.next_item(db, "ev", user)) is not None:
            store.submit(db, "ev", user, item["item"], {"preference": 0})  # identical models: ties
    main(args)
    err = capsys.readouterr().err
    assert "the evaluation finished before" in err
    human = json.loads(eval_json.read_text())["human"]
    assert (human["items"], human["judgements"], human["win_rate"]) == (4, 8, 0.5)
    assert eval_json.stat().st_mtime_ns > first and "Human evaluation (blind A/B)" in (eval_json.parent /
                                                                                      "report.html").read_text()
    with pytest.raises(SystemExit):
        main([a for a in args if a not in ("--name", "ev")])
    assert "--human needs --name" in capsys.readouterr().err
