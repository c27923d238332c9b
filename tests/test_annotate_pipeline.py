"""The loop with people in it: a two-round pipeline whose feedback is human. It stops as waiting,
simulated annotators judge over the HTTP API with a known noise level, the pipeline resumes, trains the
reward model on the export and goes on to the second round, which waits for people again."""

from __future__ import annotations

import json
import random

import pytest
import yaml

pytest.importorskip("sqlalchemy", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'rlhfkit[dev]')")

from conftest import ServerProcess  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.db import open_db  # noqa: E402
from test_pipeline import pipeline_config, run_in_process, write_config  # noqa: E402

NOISE = 0.2  # each simulated annotator picks the worse response with this probability


def annotate(url: str, tokens: list[str], project: str, seed: int) -> int:
    """Every annotator judges every item of ``project`` they are given. The better response is the
    lexicographically smaller text (a hidden utility of the pair), chosen with probability 1 - NOISE."""
    rng = random.Random(seed)
    done = 0
    for token in tokens:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            while (item := c.post(f"/api/projects/{project}/next").json()["item"]) is not None:
                left, right = item["responses"]
                better_left = left <= right
                pick_left = better_left if rng.random() >= NOISE else not better_left
                r = c.post(f"/api/projects/{project}/items/{item['item']}/judgement",
                           json={"preference": -1 if pick_left else 1})
                assert r.status_code == 201, r.text
                done += 1
    return done


def status(folder) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s["name"]: s["status"] for s in manifest["stages"]} | {"pipeline": manifest["status"]}


@pytest.mark.slow
def test_a_two_round_pipeline_waits_for_people_and_trains_on_their_judgements(tmp_path):
    cfg = pipeline_config(tmp_path, "runs", rounds=2, feedback={
        "source": "human", "k": 2, "overlap": 3, "limit": 20, "max_new_tokens": 8, "batch_size": 10})
    cfg["rl"]["max_steps"] = 4
    path = write_config(tmp_path, cfg)
    folder = tmp_path / "runs" / "pipe"

    # 1. round 1's samples go to people: the pipeline stops as waiting
    run_in_process(path)
    assert status(folder) == {"r1-feedback": "waiting", "pipeline": "waiting"}
    assert (folder / "report.html").exists()

    db = open_db(f"sqlite:///{folder / 'annotations' / 'annotate.db'}")
    tokens = [store.add_user(db, f"ann{i}") for i in range(3)]
    admin = store.add_user(db, "admin", "admin")
    server = ServerProcess(["annotate", "serve", "--dir", str(folder / "annotations")], "/api/health", token=admin)
    try:
        assert annotate(server.url, tokens, "pipe-r1", seed=1) == 60  # 20 items x 3 annotators

        # 2. resumed: export, reward model, RL and evaluation of round 1; round 2 waits for people
        run_in_process(path)
        got = status(folder)
        assert got == {"r1-feedback": "finished", "r1-rm": "finished", "r1-pg": "finished", "r1-eval": "finished",
                       "r2-feedback": "waiting", "pipeline": "waiting"}, got
        prefs = (folder / "r1-feedback" / "preferences.jsonl").read_text().splitlines()
        rm = json.loads((folder / "r1-rm" / "manifest.json").read_text())
        assert len(prefs) == 20 and rm["data"]["train_groups"] + rm["data"]["eval_groups"] == 20
        # two annotators agree when both are right or both wrong: (1 - NOISE)^2 + NOISE^2 = 0.68
        stats = json.loads((folder / "r1-feedback" / "agreement.json").read_text())
        low, high = stats["percent_agreement_ci95"]
        assert low <= (1 - NOISE) ** 2 + NOISE ** 2 <= high, stats
        # round 2 samples the improved policy
        assert yaml.safe_load((folder / "r2-feedback" / "config.yaml").read_text())["model"].endswith("r1-pg/final")
        assert annotate(server.url, tokens, "pipe-r2", seed=2) == 60

        # 3. resumed again: round 2 completes
        run_in_process(path)
        got = status(folder)
        assert got["pipeline"] == "finished" and got["r2-rm"] == "finished" and got["r2-eval"] == "finished", got
    finally:
        server.kill()


def test_the_pipeline_plans_human_feedback_and_a_blind_human_evaluation(tmp_path):
    """feedback: {source: human} makes each round's feedback an `annotate collect` stage into its own
    project; evaluate: {human: {...}} adds an `annotate ab` stage on the last round's evaluation."""
    from rlhfkit.config import from_dict
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import PipelineConfig, plan

    cfg = pipeline_config(tmp_path, "runs", rounds=2, feedback={"source": "human", "k": 3, "overlap": 2},
                          evaluate={"eval_prompts": 5, "human": {"overlap": 2, "min_judgements": 4}})
    p = from_dict(PipelineConfig, cfg).resolve()
    folder = tmp_path / "runs" / "pipe"
    stages, _ = plan(p, folder, "train.jsonl", "held.jsonl")
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages] == ["r1-feedback", "r1-rm", "r1-pg", "r1-eval", "r2-feedback", "r2-rm", "r2-pg",
                                        "r2-eval", "r2-human-eval"]
    assert by_name["r2-feedback"].command == "annotate collect" and by_name["r2-feedback"].cfg.project == "pipe-r2"
    assert by_name["r2-feedback"].cfg.model == str(folder / "r1-pg" / "final")
    assert by_name["r1-rm"].cfg.train == str(folder / "r1-feedback" / "preferences.jsonl")
    ab = by_name["r2-human-eval"].cfg
    assert (ab.eval_run, ab.overlap, ab.min_judgements) == (str(folder / "r2-eval"), 2, 4)
    with pytest.raises(ConfigError, match="source must be 'human'"):
        from_dict(PipelineConfig, {**cfg, "feedback": {"source": "crowd"}}).resolve()


@pytest.mark.slow
def test_collect_with_wait_polls_until_people_are_done(tmp_path):
    """--wait: the stage polls instead of stopping, and finishes once the items are judged."""
    import threading
    import time

    from conftest import write_jsonl
    from rlhfkit.people.collect import CollectConfig
    from rlhfkit.people.collect import run as collect

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Name a {w}."} for w in ("fruit", "tree", "bird")])
    cfg = CollectConfig(train=str(prompts), model="tiny", k=2, overlap=1, max_new_tokens=4, wait=True,
                        poll_seconds=0.2, dir=str(tmp_path / "ann"), output_dir=str(tmp_path / "runs"), name="fb",
                        progress=False)
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("run", collect(cfg)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "ann" / "annotate.db").exists():
        time.sleep(0.1)
    db = open_db(f"sqlite:///{tmp_path / 'ann' / 'annotate.db'}")
    while time.time() < deadline and "fb" not in {p["name"] for p in store.list_projects(db)}:
        time.sleep(0.1)
    time.sleep(0.5)
    assert worker.is_alive()  # polling, not finished and not stopped
    user = store.user_for_token(db, store.add_user(db, "ann"))
    while (item := store.next_item(db, "fb", user)) is not None:
        store.submit(db, "fb", user, item["item"], {"preference": 1})
    worker.join(60)
    assert not worker.is_alive()
    manifest = json.loads((tmp_path / "runs" / "fb" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["pairs"] == 3
