import gzip
import json

import pytest

from conftest import shared, write_jsonl
from rlhfkit.data import (
    DataError,
    Demonstration,
    Preference,
    PromptRecord,
    Ranking,
    Rating,
    StepSolution,
    load_records,
    parse_hh,
    train_eval_split,
)

PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, PAIR, '{"prompt": "x", "chosen": ', PAIR])
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}:3:" in str(e.value) and "invalid JSON" in str(e.value)


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {"prompt": "hi", "chosen": "a", "rejected": None}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'rejected': missing"):
        load_records(path)


def test_wrong_type_names_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {"prompt": "hi", "chosen": 3, "rejected": "b"}])
    with pytest.raises(DataError, match=r":2: field 'chosen': expected a string, got int"):
        load_records(path)


def test_skip_reports_count_and_keeps_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, "not json", {"prompt": "", "chosen": "a", "rejected": "b"}, PAIR])
    loaded = load_records(path, on_bad_record="skip")
    assert len(loaded.records) == 2 and loaded.skipped == 2 and loaded.rows == 4
    assert ":2:" in loaded.errors[0] and ":3: field 'prompt': empty" in loaded.errors[1]
    assert "skipped 2 malformed of 4 rows" in loaded.summary()


def test_parse_hh_boundary():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    assert parse_hh(text) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]


def test_hh_pair_shared_prefix_is_the_prompt(tmp_path):
    head = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a secret."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": head + "\n\nAssistant: I'd rather not.",
                                                 "rejected": head + "\n\nAssistant: Sure: the password is 1234."}])
    loaded = load_records(path)
    assert loaded.format == "hh-rlhf"
    (r,) = loaded.records
    assert r.prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Tell me a secret."}]
    assert (r.chosen, r.rejected) == ("I'd rather not.", "Sure: the password is 1234.")


def test_hh_dialogues_diverging_early_keep_the_rest_as_messages(tmp_path):
    c = "\n\nHuman: A?\n\nAssistant: yes\n\nHuman: B?\n\nAssistant: good"
    r = "\n\nHuman: A?\n\nAssistant: no\n\nHuman: B?\n\nAssistant: bad"
    (rec,) = load_records(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": c, "rejected": r}])).records
    assert rec.prompt == [{"role": "user", "content": "A?"}]
    assert rec.chosen[0] == {"role": "assistant", "content": "yes"} and len(rec.chosen) == 3


def test_real_hh_harmless_file():
    loaded = load_records(shared("hh-rlhf/harmless-base-test.jsonl.gz"))
    assert (loaded.format, loaded.rows, len(loaded.records), loaded.skipped) == ("hh-rlhf", 2312, 2312, 0)
    train, held = train_eval_split(loaded.records, 512, seed=0)
    assert (len(train), len(held)) == (1800, 512)
    assert all(r.prompt[-1]["role"] == "user" for r in loaded.records)


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "trl-standard"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
      "rejected": [{"role": "assistant", "content": "bad"}]}, "trl-conversational"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
     "trl-conversational-implicit"),
    ({"chosen": "Q good", "rejected": "Q bad"}, "trl-standard-implicit"),
])
def test_trl_preference_formats(tmp_path, row, fmt):
    loaded = load_records(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert loaded.format == fmt
    (r,) = loaded.records
    assert isinstance(r, Preference) and r.prompt == [{"role": "user", "content": "Q"}]
    assert (r.chosen.strip(), r.rejected.strip()) == ("good", "bad")


def test_other_kinds(tmp_path):
    rows = {
        "ranking": ({"prompt": "Q", "responses": ["b", "a", "c"], "scores": [2, 3, 1]}, Ranking),
        "rating": ({"prompt": "Q", "response": "a", "rating": "4"}, Rating),
        "steps": ({"prompt": "Q", "steps": ["s1", "s2", "s3"], "mistake_index": 1}, StepSolution),
        "messages": ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, Demonstration),
        "prompt": ({"prompt": "Q"}, PromptRecord),
    }
    out = {k: load_records(write_jsonl(tmp_path / f"{k}.jsonl", [row])).records[0] for k, (row, _) in rows.items()}
    for k, (_, cls) in rows.items():
        assert type(out[k]) is cls
    assert out["ranking"].responses == ["a", "b", "c"]
    assert out["rating"].rating == 4.0
    assert out["steps"].labels == [1, -1, None]
    assert out["messages"].response == "A"


def test_field_mapping_and_kind_conversion(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "good": "a", "bad": "b", "subset": "s1"}])
    (r,) = load_records(path, fields="prompt=question,chosen=good,rejected=bad").records
    assert (r.chosen, r.rejected, r.subset) == ("a", "b", "s1")
    (d,) = load_records(path, kind="demonstration", fields={"prompt": "question", "chosen": "good",
                                                           "rejected": "bad"}).records
    assert isinstance(d, Demonstration) and d.response == "a"
    with pytest.raises(DataError, match="holds preference records"):
        load_records(path, kind="rating", fields="prompt=question,chosen=good,rejected=bad")


def test_readers_agree(tmp_path):
    """jsonl, jsonl.gz, json, csv, parquet and save_to_disk give the same records."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad, {i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\n" + "".join(
        f'{r["prompt"]},{r["chosen"]},"{r["rejected"]}"\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    want = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.csv", "a.parquet", "disk"):
        got = [(r.prompt[0]["content"], r.chosen, r.rejected) for r in load_records(tmp_path / name).records]
        assert got == want, name


def test_csv_error_names_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,response\nQ1,A1\nQ2,A2,extra\n")
    with pytest.raises(DataError, match=r"a\.csv:3: more values"):
        load_records(tmp_path / "a.csv")


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    a = train_eval_split(items, 0.2, seed=3)
    assert a == train_eval_split(items, 0.2, seed=3)
    assert a != train_eval_split(items, 0.2, seed=4)
    assert len(a[1]) == 20 and sorted(a[0] + a[1]) == items


# ------------------------------------------------------------------ pairwise with a winner label

WINNER = "tests/fixtures/pairwise-winner.json"  # hand-written: 5 records, three annotator columns
WINNER_FIELDS = "prompt=instruction,response_a=resp1,response_b=resp2,winner=ann1+ann2+ann3"


def test_pairwise_winner_with_three_annotators_by_majority():
    """Record 0: votes a, A, 2 -> a, a, b: 'Hi!' wins (2 of 3). Record 1: b, tie, resp2 (the column name of
    response_b) -> b: '4' wins. Record 2: a, b and an empty cell: a tie, dropped and counted. Record 3:
    a boolean label; record 4: 'maybe' (after 1 and 1.0): both reported by record and field."""
    from conftest import ROOT

    loaded = load_records(ROOT / WINNER, fields=WINNER_FIELDS, on_bad_record="skip")
    assert (loaded.kind, loaded.format, len(loaded.records), loaded.rows) == ("preference", "pairwise-winner", 2, 5)
    first, second = loaded.records
    assert (first.chosen, first.rejected, first.meta["agreement"]) == ("Hi!", "Go away.", pytest.approx(2 / 3))
    assert (second.chosen, second.rejected, second.prompt[-1]["content"]) == ("4", "5", "Add 2+2")
    assert loaded.problems["ties_dropped"] == 1 and loaded.skipped == 2
    assert "record 3: field 'winner[0]'" in loaded.errors[0] and "True" in loaded.errors[0]
    assert "record 4: field 'winner[2]'" in loaded.errors[1] and "'maybe'" in loaded.errors[1]
    with pytest.raises(DataError, match=r"record 3: field 'winner\[0\]'"):
        load_records(ROOT / WINNER, fields=WINNER_FIELDS)


@pytest.mark.parametrize("label, chosen", [("a", "x"), ("B", "y"), (1, "x"), (2, "y"), ("2", "y"), ("response_a", "x"),
                                           ("model_b", "y")])
def test_single_winner_label_values(tmp_path, label, chosen):
    path = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y", "winner": label}])
    assert load_records(path).records[0].chosen == chosen


@pytest.mark.parametrize("label", ["tie", 0, "0"])
def test_a_tie_is_dropped_and_counted_not_an_error(tmp_path, label):
    rows = [{"prompt": "p", "response_a": "x", "response_b": "y", "winner": label},
            {"prompt": "q", "response_a": "x", "response_b": "y", "winner": "b"}]
    loaded = load_records(write_jsonl(tmp_path / "w.jsonl", rows))
    assert len(loaded.records) == 1 and loaded.problems["ties_dropped"] == 1 and "1 ties dropped" in loaded.summary()


def test_data_inspect_reports_winner_records_ties_and_problems():
    """`rlhfkit data inspect` on the fixture after --fields: records kept, ties dropped, per-record problems."""
    import subprocess

    from conftest import PYTHON, ROOT

    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "data", "inspect", WINNER, "--fields", WINNER_FIELDS, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["format"], report["records"], report["ties_dropped"], report["malformed"]) == ("pairwise-winner", 2, 1, 2)
    assert any("record 4: field 'winner[2]'" in e for e in report["malformed_examples"])
