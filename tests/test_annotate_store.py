"""The annotation app's database and logic, without HTTP: schema and migrations, the judgement types,
assignment, gold items, export, and an RM trained on an export."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("sqlalchemy", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
pytest.importorskip("alembic", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")

from conftest import chat, write_jsonl  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.db import Base, Item, Judgement, connect, open_db  # noqa: E402
from rlhfkit.people.export import consensus_pair, consensus_ranking, consensus_steps, export  # noqa: E402
from rlhfkit.people.tasks import AnswerError, canonical, options_for  # noqa: E402


@pytest.fixture
def db(tmp_path):
    return open_db(f"sqlite:///{tmp_path / 'a.db'}")


def pairs(n):
    return [{"prompt": chat(f"q{i}"), "responses": [f"first {i}", f"second {i}"]} for i in range(n)]


def users(db, n, role="annotator"):
    return [store.user_for_token(db, store.add_user(db, f"u{i}", role)) for i in range(n)]


# ------------------------------------------------------------------------------ schema


def test_migrations_build_the_schema_the_models_describe(tmp_path):
    """Alembic's head and the SQLAlchemy models agree (autogenerate finds nothing to change), so a
    database made by the migrations is the one the code expects."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = connect(f"sqlite:///{tmp_path / 'm.db'}")
    from rlhfkit.people.db import migrate

    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_nul_bytes_and_any_unicode_round_trip(db):
    text = "a\x00b \u202e evil \U0001F600"
    store.create_project(db, "nul", "likert", 1, [{"prompt": chat(text), "responses": [text]}])
    with db() as s:
        item = s.query(Item).one()
        assert item.prompt[0]["content"] == text and item.responses == [text]


# ------------------------------------------------------------------------------ answers


def test_pairwise_answers_map_back_through_the_shown_order():
    opts = options_for("pairwise")
    # shown in the item's order: +2 (right better) favours responses[1]
    assert canonical("pairwise", {"preference": 2}, [0, 1], 2, opts)[1]["winner"] == "b"
    # shown swapped: the right one is responses[0]
    _, value = canonical("pairwise", {"preference": 2}, [1, 0], 2, opts)
    assert value == {"preference": -2, "winner": "a", "strength": 2, "reason": ""}
    assert canonical("pairwise", {"preference": 0}, [1, 0], 2, opts)[1]["winner"] == "tie"
    with pytest.raises(AnswerError, match="preference: 4 is outside -3..3"):
        canonical("pairwise", {"preference": 4}, [0, 1], 2, opts)
    with pytest.raises(AnswerError, match="ranks: not a field of the pairwise task"):
        canonical("pairwise", {"preference": 1, "ranks": [1, 2]}, [0, 1], 2, opts)
    with pytest.raises(AnswerError, match="preference: expected a whole number"):
        canonical("pairwise", {"preference": True}, [0, 1], 2, opts)


def test_ranking_answers_allow_ties_and_map_back():
    # shown order [2, 0, 1]: position 0 shows response 2
    stored, value = canonical("ranking", {"ranks": [1, 2, 2]}, [2, 0, 1], 3, {})
    assert stored == {"ranks": [1, 2, 2]} and value == {"ranks": [2, 2, 1]}
    with pytest.raises(AnswerError, match="ranks: expected a list of 3 ranks"):
        canonical("ranking", {"ranks": [1, 2]}, [0, 1, 2], 3, {})
    with pytest.raises(AnswerError, match=r"ranks\[2\]: 4 is outside 1..3"):
        canonical("ranking", {"ranks": [1, 2, 4]}, [0, 1, 2], 3, {})


def test_likert_flags_must_be_the_projects():
    opts = options_for("likert", {"flags": ["hallucination", "harmful advice"]})
    assert canonical("likert", {"rating": 7, "flags": ["harmful advice", "hallucination"]}, [0], 1, opts)[1] == \
        {"rating": 7, "flags": ["hallucination", "harmful advice"]}
    with pytest.raises(AnswerError, match="flags: 'rude' is not one of this project's flags"):
        canonical("likert", {"rating": 3, "flags": ["rude"]}, [0], 1, opts)
    with pytest.raises(AnswerError, match="rating: 8 is outside 1..7"):
        canonical("likert", {"rating": 8}, [0], 1, opts)


def test_step_labels_stop_at_the_first_wrong_step_only_when_the_project_says_so():
    stop = options_for("steps", {"stop_at_first_wrong": True})
    assert canonical("steps", {"labels": [1, -1]}, [0], 4, stop)[1] == {"labels": [1, -1, None, None]}
    with pytest.raises(AnswerError, match=r"labels\[2\]: this project stops at the first wrong step"):
        canonical("steps", {"labels": [1, -1, 1, 0]}, [0], 4, stop)
    with pytest.raises(AnswerError, match="labels: 2 labels for 4 steps"):
        canonical("steps", {"labels": [1, -1]}, [0], 4, options_for("steps"))
    assert canonical("steps", {"labels": [1, -1, 0, 1]}, [0], 4, options_for("steps"))[1]["labels"] == [1, -1, 0, 1]


def test_unknown_options_and_bad_items_are_refused(db):
    with pytest.raises(AnswerError, match="option 'strenght' is not one of the pairwise task's"):
        options_for("pairwise", {"strenght": 2})
    with pytest.raises(AnswerError, match="item 0: the ranking task needs 3 to 9 responses per item, got 2"):
        store.create_project(db, "r", "ranking", 1, pairs(1))


# ------------------------------------------------------------------------------ assignment


def test_an_item_is_never_given_twice_and_leaves_the_queue_at_its_overlap(db):
    store.create_project(db, "p", "pairwise", 2, pairs(3))
    a, b, c = users(db, 3)
    seen = {u.name: [] for u in (a, b, c)}
    for u in (a, b, c, a, b, c):
        item = store.next_item(db, "p", u)
        if item is None:
            continue
        assert item["item"] not in seen[u.name], "an annotator got an item twice"
        seen[u.name].append(item["item"])
        store.submit(db, "p", u, item["item"], {"preference": 1})
    with db() as s:
        counts = {i.id: i.n_submitted for i in s.query(Item)}
    assert sorted(counts.values()) == [2, 2, 2]  # 6 judgements, 3 items, overlap 2: each exactly 2
    with pytest.raises(store.Conflict, match="judged item .* already"):
        store.submit(db, "p", a, seen["u0"][0], {"preference": -1})
    again, created = store.submit(db, "p", a, seen["u0"][0], {"preference": 1})  # a retry of the same answer
    assert not created and again["annotator"] == "u0"


def test_a_reload_shows_the_item_held_and_an_expired_lease_frees_it(db):
    store.create_project(db, "p", "pairwise", 1, pairs(1), options={"lease_minutes": 0.0001})
    a, b = users(db, 2)
    first = store.next_item(db, "p", a)
    assert store.next_item(db, "p", a)["item"] == first["item"]  # the same item again, same order
    time.sleep(0.02)  # a's lease (6 ms) runs out: b may take the item, and completes it
    taken = store.next_item(db, "p", b)
    assert taken["item"] == first["item"]
    store.submit(db, "p", b, taken["item"], {"preference": 1})
    with pytest.raises(store.Conflict, match="is complete"):
        store.submit(db, "p", a, first["item"], {"preference": 1})
    assert store.next_item(db, "p", a) is None


def test_submitting_an_item_never_given_is_refused(db):
    store.create_project(db, "p", "pairwise", 1, pairs(2))
    (a,) = users(db, 1)
    with pytest.raises(store.NotFound, match="was not given to you"):
        store.submit(db, "p", a, 1, {"preference": 1})


def test_skip_and_flag_take_the_item_out_of_that_annotators_queue(db):
    store.create_project(db, "p", "pairwise", 1, pairs(2))
    (a,) = users(db, 1)
    first = store.next_item(db, "p", a)
    store.skip(db, "p", a, first["item"], flag=True, reason="prompt is cut off")
    second = store.next_item(db, "p", a)
    assert second["item"] != first["item"]
    store.skip(db, "p", a, second["item"])
    assert store.next_item(db, "p", a) is None
    stats = store.progress(db, "p")["annotators"]["u0"]
    assert (stats["flagged"], stats["skipped"], stats["judgements"]) == (1, 1, 0)


def test_gold_items_come_at_the_set_rate_and_do_not_count_towards_overlap(db):
    gold = [{"prompt": chat(f"g{i}"), "responses": ["good", "bad"], "gold": {"winner": "a"}} for i in range(5)]
    store.create_project(db, "p", "pairwise", 1, pairs(20), gold=gold, options={"gold_rate": 0.25})
    a, b = users(db, 2)
    kinds = []
    for _ in range(12):
        item = store.next_item(db, "p", a)
        with db() as s:
            kinds.append(s.get(Item, item["item"]).is_gold)
        store.submit(db, "p", a, item["item"], {"preference": -1})
    # floor((n+1)/4) > floor(n/4) at n = 3, 7, 11: the 4th, 8th and 12th items are gold
    assert [i for i, g in enumerate(kinds) if g] == [3, 7, 11]
    # b sees the same gold items although a judged them (they are never "complete")
    got = []
    for _ in range(4):
        item = store.next_item(db, "p", b)
        got.append(item["item"])
        store.submit(db, "p", b, item["item"], {"preference": -1})
    with db() as s:
        assert s.get(Item, got[3]).is_gold
    assert "gold" not in item and "is_gold" not in item  # an annotator is not told


def test_annotators_change_only_their_own_judgements(db):
    store.create_project(db, "p", "pairwise", 2, pairs(1))
    a, b = users(db, 2)
    item = store.next_item(db, "p", a)
    j, _ = store.submit(db, "p", a, item["item"], {"preference": 3})
    with pytest.raises(store.Forbidden):
        store.get_judgement(db, j["id"], b)
    with pytest.raises(store.Forbidden):
        store.update_judgement(db, j["id"], b, {"preference": -3})
    changed = store.update_judgement(db, j["id"], a, {"preference": -1, "reason": "changed my mind"})
    assert changed["answer"]["preference"] == -1 and changed["updated_at"] is not None


# ------------------------------------------------------------------------------ export


def test_consensus_rules():
    """Majority with ties dropped, margin = the majority's mean strength; rankings by mean rank;
    steps by majority per step."""
    prompt, resp = chat("q"), ["x", "y"]
    v = [{"winner": "b", "strength": 3}, {"winner": "b", "strength": 1}, {"winner": "a", "strength": 2}]
    assert consensus_pair(prompt, resp, v, 3) == {"prompt": prompt, "chosen": "y", "rejected": "x", "votes": 3,
                                                  "agreement": 0.666667, "margin": 2.0}
    assert consensus_pair(prompt, resp, v[1:], 3) is None  # 1 vs 1: a tie
    assert consensus_pair(prompt, resp, [{"winner": "tie", "strength": 0}] * 2 + v[:1], 3) is None
    assert "margin" not in consensus_pair(prompt, resp, v, 1)
    r = consensus_ranking(prompt, ["a", "b", "c"], [{"ranks": [2, 1, 3]}, {"ranks": [1, 1, 3]}, {"ranks": [3, 1, 2]}])
    assert r["responses"] == ["b", "a", "c"] and r["mean_ranks"] == [1.0, 2.0, 2.666667]
    assert consensus_ranking(prompt, ["a", "b", "c"], [{"ranks": [1, 2, 3]}, {"ranks": [2, 1, 3]}]) is None
    s = consensus_steps(prompt, ["s1", "s2", "s3"], [{"labels": [1, -1, None]}, {"labels": [1, -1, None]},
                                                     {"labels": [1, 1, 1]}], True)
    assert s["labels"] == [1, -1, None]


def judge_all(db, name, annotators, answer_for):
    for u in annotators:
        while (item := store.next_item(db, name, u)) is not None:
            store.submit(db, name, u, item["item"], answer_for(u, item))


def test_an_export_trains_a_reward_model(db, tmp_path):
    """Three annotators judge 12 pairs, two of them preferring the longer answer; the export is read by
    ``rm train`` as it is, and the run trains on every exported pair."""
    items = [{"prompt": chat(f"Name a colour ({i})"), "responses": ["Red.", "Red is the colour of ripe tomatoes."]}
             for i in range(12)]
    store.create_project(db, "colours", "pairwise", 3, items)
    ann = users(db, 3)

    def longer(u, item):
        left_longer = len(item["responses"][0]) > len(item["responses"][1])
        pick_left = left_longer if u.name != "u2" else not left_longer
        return {"preference": -2 if pick_left else 2}

    judge_all(db, "colours", ann, longer)
    stats = export(db, "colours", tmp_path / "out")
    assert stats["rows"] == 12 and stats["judgements"] == 36
    rows = [json.loads(x) for x in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    assert all(r["chosen"].startswith("Red is") and r["margin"] == 2.0 and r["agreement"] == 0.666667 for r in rows)
    events = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 36 and {e["annotator"] for e in events} == {"u0", "u1", "u2"}
    assert all(e["order"] in ([0, 1], [1, 0]) and e["seconds"] >= 0 for e in events)

    from rlhfkit.train.reward import RMConfig
    from rlhfkit.train.reward import run as train

    run = train(RMConfig(train=str(tmp_path / "out" / "preferences.jsonl"), output_dir=str(tmp_path / "runs"),
                         name="rm", batch_size=4, micro_batch_size=4, epochs=1, model="tiny", max_length=64,
                         progress=False))
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["data"]["train"]["total"] == 12 and manifest["data"]["train_groups"] == 12
    assert (run.path / "final" / "config.json").exists()


def test_every_task_exports_a_file_its_trainer_reads(db, tmp_path):
    from rlhfkit.data.formats import load_records

    store.create_project(db, "rank", "ranking", 2, [{"prompt": chat("q"), "responses": ["a", "b", "c"]}])
    store.create_project(db, "rate", "likert", 2, [{"prompt": chat("q"), "responses": ["a"]}])
    store.create_project(db, "step", "steps", 2, [{"prompt": chat("q"), "responses": ["s1", "s2"]}])
    store.create_project(db, "crit", "critique", 2, [{"prompt": chat("q"), "responses": ["a"]}])
    ann = users(db, 2)
    judge_all(db, "rank", ann, lambda u, it: {"ranks": [sorted(it["responses"]).index(x) + 1 for x in it["responses"]]})
    judge_all(db, "rate", ann, lambda u, it: {"rating": 6 if u.name == "u0" else 4, "flags": ["hallucination"]})
    judge_all(db, "step", ann, lambda u, it: {"labels": [1, -1]})
    judge_all(db, "crit", ann, lambda u, it: {"critique": f"too short, says {u.name}"})
    for name, kind, fname in (("rank", "ranking", "rankings.jsonl"), ("rate", "rating", "ratings.jsonl"),
                              ("step", "steps", "steps.jsonl")):
        export(db, name, tmp_path / name)
        (rec,) = load_records(tmp_path / name / fname, kind=kind).records
        if kind == "ranking":
            assert rec.responses == ["a", "b", "c"]
        elif kind == "rating":
            assert rec.rating == 5.0 and rec.meta["flags"] == {"hallucination": 1.0}
        else:
            assert rec.steps == ["s1", "s2"] and rec.labels == [1, -1]
    export(db, "crit", tmp_path / "crit")
    crits = [json.loads(x) for x in (tmp_path / "crit" / "critiques.jsonl").read_text().splitlines()]
    assert sorted(c["critique"] for c in crits) == ["too short, says u0", "too short, says u1"]


# ------------------------------------------------------------------------------ the CLI


def test_create_from_a_file_users_and_stats_through_the_cli(tmp_path, capsys):
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "Best fruit?", "responses": ["Apple.", "Pear.", "Plum.", "Fig."]},
        {"prompt": "Best tree?", "responses": ["Oak.", "Ash."]},  # too few for a ranking: left out, counted
    ])
    folder = str(tmp_path / "ann")
    main(["annotate", "create", "--dir", folder, "--project", "fruit", "--task", "ranking", "--train", str(data),
          "--overlap", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 1 and summary["left_out"] == {"prompts_with_under_3_responses": 1}
    main(["annotate", "users", "add", "ann1", "--dir", folder])
    token = json.loads(capsys.readouterr().out)["token"]
    db = open_db(f"sqlite:///{tmp_path / 'ann' / 'annotate.db'}")
    user = store.user_for_token(db, token)
    assert user.name == "ann1" and user.role == "annotator"
    with db() as s:
        assert s.query(Judgement).count() == 0
    with pytest.raises(SystemExit):  # a second project of the same name: one line, exit 2
        main(["annotate", "create", "--dir", folder, "--project", "fruit", "--task", "ranking", "--train", str(data)])
    assert "a project named 'fruit' exists already" in capsys.readouterr().err
    main(["annotate", "stats", "--dir", folder, "--project", "fruit", "--json"])
    assert json.loads(capsys.readouterr().out)["items"] == 1


@pytest.mark.slow
def test_create_samples_k_responses_per_prompt_from_a_policy(tmp_path, capsys):
    """Prompts plus a policy: k responses each through the rollout engine (the tiny model)."""
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}."} for w in ("yes", "no", "maybe")])
    main(["annotate", "create", "--dir", str(tmp_path / "ann"), "--project", "s", "--task", "ranking",
          "--train", str(data), "--k", "3", "--model", "tiny", "--max-new-tokens", "5"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 3
    db = open_db(f"sqlite:///{tmp_path / 'ann' / 'annotate.db'}")
    with db() as s:
        assert all(len(i.responses) == 3 for i in s.query(Item))


def test_gold_from_a_labelled_file_export_and_disable_through_the_cli(tmp_path, capsys):
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                                  for i in range(4)])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    folder = str(tmp_path / "ann")
    main(["annotate", "create", "--dir", folder, "--project", "g", "--train", str(data), "--gold", str(gold),
          "--gold-rate", "0.5", "--overlap", "1", "--strength", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gold"] == 1
    db = open_db(f"sqlite:///{tmp_path / 'ann' / 'annotate.db'}")
    token = store.add_user(db, "ann")
    user = store.user_for_token(db, token)
    shown = []
    while (item := store.next_item(db, "g", user)) is not None:
        shown.append(item["prompt"][0]["content"])
        store.submit(db, "g", user, item["item"], {"preference": -1})
    assert shown[1] == "2+2?" and len(shown) == 5  # gold second (rate 0.5), then the rest
    with db() as s:
        (g,) = [i for i in s.query(Item) if i.is_gold]
        assert g.gold == {"winner": "a"} and g.responses == ["4", "5"]
    main(["annotate", "export", "--dir", folder, "--project", "g"])
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows"], stats["gold_items_left_out"], stats["judgements"]) == (4, 1, 5)
    assert (tmp_path / "ann" / "export" / "g" / "preferences.jsonl").exists()
    main(["annotate", "users", "disable", "ann", "--dir", folder])
    assert store.user_for_token(db, token) is None
    with pytest.raises(SystemExit):
        main(["annotate", "users", "disable", "nobody", "--dir", folder])
    assert "no user named 'nobody'" in capsys.readouterr().err
