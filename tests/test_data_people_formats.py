"""The data formats people bring: ShareGPT, Alpaca and UltraFeedback-style rows (fixtures written for this
project in tests/fixtures/formats/), column joining in --fields, and fields a format does not read, which
are reported and never dropped without a word."""

import json
import subprocess

import pytest

from conftest import PYTHON, ROOT, write_jsonl
from rlhfkit.data import DataError, Demonstration, Preference, PromptRecord, Ranking, load_records

FORMATS = ROOT / "tests" / "fixtures" / "formats"


def test_sharegpt_conversations_are_demonstrations_with_their_roles():
    loaded = load_records(FORMATS / "sharegpt.jsonl")
    assert (loaded.kind, loaded.format, len(loaded.records)) == ("demonstration", "sharegpt", 8)
    first, second = loaded.records[:2]
    assert isinstance(first, Demonstration)
    assert first.prompt == [{"role": "user", "content": "What is 7 times 8?"}] and first.response == "56."
    assert second.prompt[0] == {"role": "system", "content": "Answer in one word or number."}
    assert second.meta == {"id": "sg-1"} and loaded.unread == {"id": 8}


def test_sharegpt_with_chosen_and_rejected_turns_is_a_preference():
    loaded = load_records(FORMATS / "sharegpt-preference.jsonl")
    r = loaded.records[1]
    assert isinstance(r, Preference) and loaded.format == "sharegpt"
    assert (r.prompt, r.chosen, r.rejected) == ([{"role": "user", "content": "Name the capital of France."}], "Paris.",
                                                "I am not sure, it could be many things.")


def test_a_sharegpt_turn_from_an_unknown_speaker_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "narrator", "value": "x"},
                                                                  {"from": "gpt", "value": "y"}]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: field 'conversations\[0\]\.from'.*'narrator'"):
        load_records(path)


def test_alpaca_joins_instruction_and_input_as_its_template_separates_them():
    """Alpaca's template puts the input after the instruction, a blank line between; an empty input is left
    out. The original Alpaca file is a JSON array."""
    loaded = load_records(FORMATS / "alpaca.json")
    assert (loaded.kind, loaded.format, len(loaded.records)) == ("demonstration", "alpaca", 6)
    assert loaded.records[0].prompt == [{"role": "user", "content": "Translate the word into French.\n\ncat"}]
    assert loaded.records[0].response == "chat"
    assert loaded.records[2].prompt == [{"role": "user", "content": "Write a greeting."}]  # input ""
    assert loaded.unread == {}
    pairs = load_records(FORMATS / "alpaca-preference.jsonl")
    assert pairs.format == "alpaca" and pairs.records[1].chosen == "42" and pairs.records[1].rejected == "No."
    prompts = load_records(FORMATS / "alpaca.json", kind="prompt")
    assert isinstance(prompts.records[1], PromptRecord) and prompts.records[1].prompt[0]["content"] == "Add the two numbers.\n\n12 and 30"


def test_alpaca_history_and_system_become_earlier_turns(tmp_path):
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.", "history": [["2+2?", "4"]]}
    r = load_records(write_jsonl(tmp_path / "a.jsonl", [row])).records[0]
    assert r.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def test_fields_join_columns_by_a_blank_line(tmp_path):
    """--fields prompt=instruction+input on a file whose columns are named otherwise: the two joined (an
    empty part left out), not a list that fails on every record, and not the instruction alone."""
    rows = [{"task": "Translate.", "text": "chat", "answer": "cat"}, {"task": "Say hi.", "text": "", "answer": "hi"}]
    loaded = load_records(write_jsonl(tmp_path / "t.jsonl", rows), fields="prompt=task+text,response=answer")
    assert [r.prompt[0]["content"] for r in loaded.records] == ["Translate.\n\nchat", "Say hi."]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"task": "x", "text": ["not", "text"], "answer": "y"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'text': --fields prompt=task\+text joins text columns"):
        load_records(bad, fields="prompt=task+text,response=answer")


def test_ultrafeedback_rows_are_rankings_by_score():
    loaded = load_records(FORMATS / "ultrafeedback.jsonl")
    assert (loaded.kind, loaded.format, len(loaded.records)) == ("ranking", "ultrafeedback", 9)
    r = loaded.records[1]  # scores 9, 7.5, 2, 2 (odd rows: the last scores 2)
    assert isinstance(r, Ranking) and r.prompt == [{"role": "user", "content": "Name the capital of France."}]
    assert r.responses[:3] == ["Paris.", "Let me think. Paris.", "I do not know."]
    assert r.meta == {"source": "written-for-rlhfkit"}


def test_ultrafeedback_binarised_best_against_the_worst_or_a_random_lower_one():
    worst = load_records(FORMATS / "ultrafeedback.jsonl", completions="best-vs-worst")
    assert worst.kind == "preference" and len(worst.records) == 8 and worst.problems["ties_dropped"] == 1
    r = worst.records[0]  # scores 9, 7.5, 2, 1
    assert (r.chosen, r.rejected, r.meta["chosen_score"], r.meta["rejected_score"]) == ("56.", "Something else entirely.", 9.0, 1.0)
    random_a = load_records(FORMATS / "ultrafeedback.jsonl", completions="best-vs-random").records
    random_b = load_records(FORMATS / "ultrafeedback.jsonl", completions="best-vs-random").records
    assert [r.rejected for r in random_a] == [r.rejected for r in random_b]  # the same pairs on every read
    assert all(r.meta["rejected_score"] < r.meta["chosen_score"] for r in random_a)
    assert len({r.meta["rejected_score"] for r in random_a}) > 1  # not always the worst


def test_a_stage_that_needs_pairs_points_at_the_binarising_flag():
    with pytest.raises(DataError, match="--completions best-vs-random"):
        load_records(FORMATS / "ultrafeedback.jsonl", kind="preference")


def test_record_fields_a_format_ignores_are_said_in_the_summary(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "response": "4", "id": 1}]
    loaded = load_records(write_jsonl(tmp_path / "p.jsonl", rows))
    assert loaded.ignored() == {"response": 1} and loaded.unread == {"response": 1, "id": 1}
    assert "not read by this format: response (1 rows)" in loaded.summary()


@pytest.mark.parametrize("name, fmt, records", [("sharegpt.jsonl", "sharegpt", 8), ("alpaca.json", "alpaca", 6),
                                                ("ultrafeedback.jsonl", "ultrafeedback", 9)])
def test_data_inspect_names_the_format_counts_and_unread_fields(name, fmt, records):
    out = subprocess.run([PYTHON, "-m", "rlhfkit", "data", "inspect", str(FORMATS / name), "--model", "tiny", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["format"], report["records"], report["malformed"]) == (fmt, records, 0)
    expected = {"sharegpt.jsonl": {"id": 8}, "alpaca.json": {}, "ultrafeedback.jsonl": {"source": 9}}[name]
    assert report["unread_fields"] == {"ignored": {}, "metadata": expected}


@pytest.mark.slow
@pytest.mark.parametrize("stage, name, extra", [
    ("sft", "sharegpt.jsonl", []), ("sft", "alpaca.json", []), ("sft", "ultrafeedback.jsonl", []),
    ("rm train", "sharegpt-preference.jsonl", []), ("rm train", "alpaca-preference.jsonl", []),
    ("rm train", "ultrafeedback.jsonl", ["--completions", "best-vs-random"]),
    ("rm train", "ultrafeedback.jsonl", ["--kind", "ranking"]),
])
def test_sft_and_rm_train_run_a_step_on_each_format(tmp_path, stage, name, extra):
    out = subprocess.run([PYTHON, "-m", "rlhfkit", *stage.split(), "--model", "tiny", "--train", str(FORMATS / name),
                          "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--output-dir",
                          str(tmp_path), "--name", "run", "--no-progress", *extra],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 1 and "loss" in m for m in metrics)
    assert (tmp_path / "run" / "final").is_dir()
