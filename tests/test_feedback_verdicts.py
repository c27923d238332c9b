"""The judge's verdict parsing and MT-Bench's swap-consistency rule, and the judge stage."""

import json

from conftest import json_server
from rlhfkit.feedback.verdicts import (
    combine_swapped,
    consistent,
    parse_pairwise,
    parse_rating,
    summarise_pairwise,
)


def test_parse_pairwise_never_raises():
    assert parse_pairwise("... so my verdict is [[A]]") == "A"
    assert parse_pairwise("[[A]] at first, but on reflection [[B]]") == "B"  # the last verdict counts
    assert parse_pairwise("It is a tie: [[C]]") == "tie"
    for bad in ("", None, "A is better", "[[D]]", "[A]"):
        assert parse_pairwise(bad) is None


def test_parse_rating():
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("Rating: 8.5") == 8.5
    assert parse_rating("[[11]]") is None and parse_rating("no score") is None and parse_rating(None) is None


def test_swap_consistency():
    """x wins only if picked in both orders; a flip, a tie or garbage is a tie. Four pairs:
    (A, B) x wins, consistent; (B, A) y wins, consistent; (A, A) position bias: tie, inconsistent;
    (None, B) unparsable: tie, inconsistent. Consistency 2/4, 1 unparsable answer."""
    assert combine_swapped("A", "B") == "x" and combine_swapped("B", "A") == "y"
    assert combine_swapped("A", "A") == "tie" and combine_swapped("tie", "B") == "tie" and combine_swapped(None, "B") == "tie"
    assert consistent("tie", "tie") and not consistent("A", "A") and not consistent(None, None)
    out = summarise_pairwise(["A", "B", "A", None], ["B", "A", "A", "B"])
    assert (out["x_wins"], out["y_wins"], out["ties"]) == (1, 1, 2)
    assert out["consistency"] == 0.5 and out["unparsable"] == 1


def judge_answer(body):
    """An OpenAI-compatible judge: it prefers the answer that mentions 'thank', in both orders, except
    for question 'Q2' where it always says [[A]] (position bias), and answers garbage for 'Q3'."""
    user = body["messages"][-1]["content"]
    assert body["temperature"] == 0
    a = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    if "Q3" in user:
        text = "I cannot decide."
    elif "Q2" in user:
        text = "Verdict: [[A]]"
    else:
        text = "[[A]]" if "thank" in a.lower() else "[[B]]"
    return 200, {"choices": [{"message": {"content": text}}]}


def test_judge_stage_with_an_http_judge(tmp_path):
    """Four pairs: Q0 and Q1 consistent wins for 'chosen'; Q2 position bias (A both times): tie,
    inconsistent; Q3 unparsable twice: tie. accuracy 2/4, consistency 2/4, 2 unparsable answers."""
    from rlhfkit.feedback.judge import JudgeConfig
    from rlhfkit.feedback.judge import run as run_judge

    rows = [{"prompt": f"Q{i}", "chosen": "Thank you, here it is.", "rejected": "No."} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with json_server(judge_answer) as base:
        run = run_judge(JudgeConfig(data=str(data), judge_url=f"{base}/v1", judge_model="fake",
                                    output_dir=str(tmp_path / "runs"), name="j"))
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["n"] == 4 and summary["accuracy"] == 0.5 and summary["ties"] == 2
    assert summary["consistency"] == 0.5 and summary["unparsable"] == 2
    lines = (tmp_path / "runs" / "j" / "judgements.jsonl").read_text().splitlines()
    assert [json.loads(x)["result"] for x in lines] == ["chosen", "chosen", "tie", "tie"]


def test_label_then_rm_train_end_to_end(tmp_path):
    """rlhfkit label samples k = 3 responses per prompt from the tiny model, labels (best, worst) by a
    rule, and rlhfkit rm train reads the preference file as it is."""
    from rlhfkit.feedback.label import LabelConfig, reward_pairs
    from rlhfkit.feedback.label import run as run_label
    from rlhfkit.train.reward import RMConfig
    from rlhfkit.train.reward import run as train

    assert reward_pairs([0.1, 0.9, 0.5], "best_worst") == [(1, 0, 0.8)]
    assert reward_pairs([0.5, 0.5], "best_worst") == []
    assert reward_pairs([0.0, 1.0, 0.0], "all") == [(1, 0, 1.0), (1, 2, 1.0)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(12)))
    rule = tmp_path / "rule.yaml"
    rule.write_text("max_words: 3\nw_repetition: 1.0\n")
    stats = run_label(LabelConfig(model="tiny", train=str(prompts), reward=f"rule:{rule}", k=3, max_new_tokens=8,
                                  output_dir=str(tmp_path / "runs"), name="label", progress=False)).manifest()["summary"]
    assert stats["pairs"] + stats["ties"] == 12 and stats["pairs"] > 0
    run = train(RMConfig(model="tiny", train=str(tmp_path / "runs" / "label" / "preferences.jsonl"), batch_size=4,
                         micro_batch_size=4, max_steps=2, output_dir=str(tmp_path / "runs"), name="rm", progress=False))
    assert (run.path / "final" / "model.safetensors").is_file()
