import json
import subprocess

import pytest

from conftest import PYTHON, ROOT, shared, write_jsonl
from rlhfkit.data import load_records
from rlhfkit.models.groups import encode_groups
from rlhfkit.models.reward import load_reward_model
from rlhfkit.train.reward import LOSSES, RMConfig
from rlhfkit.train.reward import run as train

TINY = dict(model="tiny", progress=False, max_length=128, lr=3e-3, warmup_ratio=0.0, save_every=1000)


def pairs(tmp_path, n=48):
    """A learnable preference: the chosen answer is polite, the rejected one rude."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Thank you for asking, the answer is {i}.",
             "rejected": f"Whatever. {i}."} for i in range(n)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize("kind", ["pairwise", "ranking", "orm", "prm"])
def test_shared_prefix_packing_gives_the_same_loss(tmp_path, kind):
    rows = {
        "pairwise": {"prompt": "Q", "chosen": "good answer", "rejected": "bad"},
        "ranking": {"prompt": "Q", "responses": ["best", "middle one", "worst of all"]},
        "orm": {"prompt": "Q", "steps": ["a", "b c"], "labels": [1, 1], "correct": True},
        "prm": {"prompt": "Q", "steps": ["a", "b c", "d"], "labels": [1, -1, None]},
    }
    path = write_jsonl(tmp_path / "d.jsonl", [rows[kind], {**rows[kind], "prompt": "A longer question here?"}])
    rm, tok = load_reward_model("tiny", num_labels=3 if kind == "prm" else 1)
    cfg = RMConfig(kind=kind, max_length=64)
    groups, _ = encode_groups(load_records(path).records, cfg.kind, tok, cfg.max_length)
    stats = {"pad_id": tok.pad_token_id}
    losses = []
    for share in (True, False):
        cfg.share_prefix = share
        losses.append(LOSSES[kind](rm, groups, cfg, stats)[0].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_orm_solutions_of_one_question_form_one_group_with_the_ranking_term(tmp_path):
    """Five solutions to two questions become two groups (solutions and labels in record order). The
    loss of the packed groups is the token BCE plus coef x the pairs term over each question's (correct,
    wrong) pairs, all recomputed from each solution scored on its own row."""
    import torch

    from rlhfkit.data.template import encode_prompt
    from rlhfkit.losses.preference import per_prompt_pairs
    from rlhfkit.models.groups import encode_steps

    sols = [("Q one?", ["1 + 1 = 2", "So 2."], True), ("Q two is longer?", ["3"], False), ("Q one?", ["1 + 1 = 3"], False),
            ("Q two is longer?", ["4", "So 4."], True), ("Q one?", ["It is 2."], True)]
    path = write_jsonl(tmp_path / "o.jsonl", [{"prompt": p, "steps": s, "correct": c} for p, s, c in sols])
    records = load_records(path).records
    rm, tok = load_reward_model("tiny")
    cfg = RMConfig(kind="orm", max_length=64, orm_rank_coef=0.5)
    groups, _ = encode_groups(records, "orm", tok, cfg.max_length, merge=True)
    assert [len(g.responses) for g in groups] == [3, 2] and [g.targets for g in groups] == [[1, 0, 1], [0, 1]]
    loss, stat = LOSSES["orm"](rm, groups, cfg, {"pad_id": tok.pad_token_id})

    # each solution on its own row: eq. 20 over its solution tokens, and its final score
    bce_num, bce_den, finals = 0.0, 0, []
    for r in records:
        ids, _ = encode_steps(tok, r.steps)
        seq = encode_prompt(tok, r.prompt)
        full = torch.tensor([seq + ids])
        z = rm(full, torch.ones_like(full))[0, len(seq):, 0]
        target = torch.full_like(z, float(r.correct))
        bce_num += torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum")
        bce_den += len(ids)
        finals.append(z[-1])
    f = torch.stack(finals)
    rewards = torch.stack([torch.stack([f[0], f[2], f[4]]), torch.stack([f[1], f[3], f[3]])])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = bce_num / bce_den + 0.5 * per_prompt_pairs(rewards, mask, labels=labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert stat["n"] == 5.0


def test_pairwise_training_learns_and_saves_hf_format(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = train(RMConfig(train=str(pairs(tmp_path)), eval_size=8, output_dir=str(tmp_path / "runs"), name="rm",
                         batch_size=8, micro_batch_size=4, epochs=3, center_coef=0.01, **TINY))
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std"} <= set(rows[0])
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["eval_accuracy"] == 1.0 and summary["eval_margin"] > 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(run.path / "final"))
    assert hf.config.num_labels == 1

    # rm eval on the same held-out pairs, with the length baselines and the plots
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "rm", "eval", "--model", str(run.path / "final"),
                          "--data", str(tmp_path / "pairs.jsonl"), "--eval-size", "8", "--output", str(tmp_path / "ev")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["n"] == 8 and result["accuracy"] == 1.0 and result["baselines"]["longer_wins"] == 1.0
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000 and (tmp_path / "ev" / "margins.png").is_file()

    # rm score writes every row back with its rewards
    demo = write_jsonl(tmp_path / "demo.jsonl", [{"prompt": "Question 1?", "response": "Thank you for asking, the answer is 1.", "id": 7}])
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "rm", "score", "--reward", str(run.path / "final"),
                          "--data", str(demo), "--output", str(tmp_path / "scored.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert row["id"] == 7 and isinstance(row["reward"], float)
    # any --reward: the same model plus a rule term, weighted, adds the rule's value to the model's
    rule = tmp_path / "rule.yaml"
    rule.write_text("keywords: [answer]\n")
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "rm", "score", "--reward", f"1.0*{run.path / 'final'} + 2.0*rule:{rule}",
                          "--data", str(demo), "--output", str(tmp_path / "scored2.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row2,) = [json.loads(x) for x in (tmp_path / "scored2.jsonl").read_text().splitlines()]
    assert row2["reward"] == pytest.approx(row["reward"] + 2.0, abs=1e-5)


@pytest.mark.parametrize("kind,rows", [
    ("ranking", [{"prompt": f"Q{i}", "responses": ["Thank you, good answer.", "An answer.", "No."]} for i in range(16)]),
    ("rating", [{"prompt": f"Q{i}", "response": "Thank you, good answer." if i % 2 else "No.", "rating": 6 if i % 2 else 1}
                for i in range(16)]),
    ("orm", [{"prompt": f"Q{i}", "steps": ["2 + 2 = 4" if i % 2 else "2 + 2 = 5", "So 4."], "correct": bool(i % 2)}
             for i in range(16)]),
    ("prm", [{"prompt": f"Q{i}", "steps": ["Start.", "2 + 2 = 5" if i % 2 else "2 + 2 = 4", "Done."],
              "mistake_index": 1 if i % 2 else None} for i in range(16)]),
])
def test_every_kind_trains(tmp_path, kind, rows):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    lr = 3e-4 if kind == "rating" else 3e-3  # regression oscillates at the higher rate
    run = train(RMConfig(train=str(path), kind=kind, output_dir=str(tmp_path / "runs"), name=kind, batch_size=8,
                         micro_batch_size=4, epochs=4, **{**TINY, "lr": lr}))
    losses = [json.loads(x)["loss"] for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert (run.path / "final" / "model.safetensors").is_file()


def test_normalized_bias_centres_reference_responses(tmp_path):
    """--normalize-on sets the bias so those responses score 0 on average, after reloading too."""
    from rlhfkit.models.reward import score

    refs = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": f"Question {i}?", "response": f"It is {i}."} for i in range(6)])
    run = train(RMConfig(train=str(pairs(tmp_path, 16)), output_dir=str(tmp_path / "runs"), name="norm", batch_size=8,
                         micro_batch_size=8, max_steps=2, normalize_on=str(refs), **TINY))
    rm, tok = load_reward_model(str(run.path / "final"))
    assert abs(rm.bias) > 1e-4
    recs = load_records(refs).records
    rewards = score(rm, tok, [r.prompt for r in recs], [r.response for r in recs])
    assert abs(sum(rewards) / len(rewards)) < 1e-5 and max(rewards) - min(rewards) > 1e-4


def test_rating_classification_head(tmp_path):
    rows = [{"prompt": f"Q{i}", "response": "ok", "rating": float(i % 7 + 1)} for i in range(16)]
    run = train(RMConfig(train=str(write_jsonl(tmp_path / "r.jsonl", rows)), kind="rating", rating_loss="classification",
                         output_dir=str(tmp_path / "runs"), name="cls", batch_size=8, micro_batch_size=8, max_steps=2,
                         **TINY))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(run.path / "final")).num_labels == 3


def test_orm_and_prm_eval_on_real_data_formats(tmp_path):
    """The GSM8K verifier file expands into 4 solutions per question; big-bench-mistake reads with
    prompt=input; rm eval reports best-of-n / first-wrong-step with their baselines (untrained tiny RM)."""
    gsm = shared("gsm8k/example_model_solutions.jsonl.gz")
    bbm = shared("big-bench-mistake/word_sorting.jsonl.gz")
    from rlhfkit.eval.reward import RMEvalConfig, evaluate

    orm = evaluate(RMEvalConfig(model="tiny", data=str(gsm), kind="orm", eval_size=20, split_by="question_id"))
    assert orm["n_questions"] == 20 and orm["candidates_per_question"] == [4]
    assert set(orm["baselines"]) == {"random", "longest", "shortest"}
    prm = evaluate(RMEvalConfig(model="tiny", data=str(bbm), kind="prm", fields="prompt=input", eval_size=10))
    assert prm["n_traces"] == 10 and 0 <= prm["first_wrong_step_accuracy"] <= 1
    assert set(prm["baselines"]) == {"no_mistake", "last_step"}
    fast = evaluate(RMEvalConfig(model="tiny", data=str(gsm), kind="orm", eval_size=20, split_by="question_id",
                                 mixed_precision="bf16"))
    assert fast["auc"] == pytest.approx(orm["auc"], abs=0.05)  # bf16 scores: the same ranking, give or take ties


def test_token_budget_micro_batches_train_the_same(tmp_path):
    """--micro-batch-tokens cuts each step's groups by padded tokens instead of by count. The step's
    groups and their weights are the same, so 3 steps give the same losses and the same final scores
    as --micro-batch-size 4 (within fp32 summation order), and held-out accuracy is the same."""
    from rlhfkit.data.batching import split_by_tokens

    assert split_by_tokens(list("abcde"), [1, 2, 3, 4, 9], 8) == [["a", "b"], ["c", "d"], ["e"]]
    data = str(pairs(tmp_path, 24))
    runs = [train(RMConfig(train=data, eval_size=8, output_dir=str(tmp_path / "runs"), name=f"r{budget}", batch_size=8,
                           micro_batch_size=4, micro_batch_tokens=budget, max_steps=3, **TINY)) for budget in (0, 40)]
    losses = [[json.loads(x)["loss"] for x in (r.path / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    summaries = [json.loads((r.path / "manifest.json").read_text())["summary"] for r in runs]
    assert summaries[0]["eval_loss"] == pytest.approx(summaries[1]["eval_loss"], abs=1e-5)
