"""rlhfkit dpo on the tiny model: step-0 values, the logprob boundary, packing, the reference cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from rlhfkit.data import load_records
from rlhfkit.models.groups import encode_groups
from rlhfkit.train.dpo import DPOConfig, sequence_logprobs
from rlhfkit.train.dpo import run as train

TINY = dict(model="tiny", progress=False, max_length=128, warmup_ratio=0.0, save_every=1000, lora_r=8, lr=3e-3)


def pairs(tmp_path, n=40):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Thank you for asking, the answer is {i}.",
             "rejected": f"Whatever. {i}."} for i in range(n)]
    return str(write_jsonl(tmp_path / "pairs.jsonl", rows))


def test_sequence_logprobs_match_a_plain_forward(tmp_path):
    """Summed response logprobs from the packed row (prompt once, chosen and rejected after it) and from
    separate rows both equal log_softmax(model(prompt + response))[t-1][token t] summed over the response
    tokens, computed here directly (the first response token is predicted by the last prompt token)."""
    from rlhfkit.losses.lm import token_logprobs
    from rlhfkit.models import load_causal_lm

    model, tok = load_causal_lm("tiny", seed=1)
    groups, _ = encode_groups(load_records(pairs(tmp_path, 3)).records, "pairwise", tok, 128)
    with torch.no_grad():
        shared, n_shared = sequence_logprobs(model, groups, tok.pad_token_id, True)
        plain, n_plain = sequence_logprobs(model, groups, tok.pad_token_id, False)
        want = []
        for g in groups:
            for r in g.responses:
                ids = torch.tensor([g.prompt + r])
                want.append(token_logprobs(model(ids).logits, ids)[0, len(g.prompt) - 1:].sum())
    torch.testing.assert_close(shared, torch.stack(want), atol=1e-4, rtol=0)
    torch.testing.assert_close(plain, torch.stack(want), atol=1e-4, rtol=0)
    assert n_shared.tolist() == n_plain.tolist() == [float(len(r)) for g in groups for r in g.responses]


def test_dpo_starts_at_log2_and_learns(tmp_path):
    """Step 0 (pi = pi_ref, LoRA B = 0): held-out loss log 2 = 0.693147, rewards 0, accuracy 0 (ties are
    wrong). After 3 epochs on polite-vs-rude pairs the held-out implicit-reward accuracy is above 0.9
    and the margins are positive; the logged names are TRL's."""
    run = train(DPOConfig(train=pairs(tmp_path), eval_size=8, output_dir=str(tmp_path / "runs"), name="dpo",
                          batch_size=8, micro_batch_size=4, epochs=3, **TINY))
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    step0 = rows[0]
    assert step0["step"] == 0
    assert step0["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step0["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6) and step0["eval_rewards/accuracies"] == 0.0
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in rows[1]
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["eval_rewards/accuracies"] > 0.9 and summary["eval_rewards/margins"] > 0
    assert (run.path / "curves.png").is_file() and (run.path / "final" / "config.json").is_file()


@pytest.mark.parametrize("loss", ["ipo", "robust", "hinge"])
def test_precomputed_reference_gives_the_same_steps(tmp_path, loss):
    """--precompute-ref caches pi_ref's logprobs once; the losses of 2 steps equal those computed with
    the adapter switched off each step (every variant runs)."""
    runs = [train(DPOConfig(train=pairs(tmp_path, 16), output_dir=str(tmp_path / "runs"), name=f"{loss}{pre}",
                            batch_size=8, micro_batch_size=4, max_steps=2, loss=loss, label_smoothing=0.1,
                            precompute_ref=pre, **TINY)) for pre in (False, True)]
    losses = [[json.loads(x)["loss"] for x in (r.path / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert (runs[1].path / "reference_logps.pt").is_file()
