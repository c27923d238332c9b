import math

import pytest
import torch

from rlhfkit.data import encode_prompt, encode_response, pad
from rlhfkit.models.reward import last_token_index, load_reward_model, save_reward_model, score

PROMPTS = [[{"role": "user", "content": f"Question number {i}: " + "why? " * i}] for i in range(8)]
ANSWERS = [("Because. " * (i % 3 + 1)).strip() for i in range(8)]


def test_last_token_index_left_and_right():
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])).tolist() == [1, 3, 3]


def test_head_init_scale():
    """The head is N(0, 1/sqrt(d+1)): for d = 64, std 0.1240 (the 64 weights' sample std is within 25%)."""
    rm, _ = load_reward_model("tiny", seed=0)
    w = rm.hf.score.weight
    assert w.shape == (1, 64) and rm.hf.score.bias is None
    assert abs(w.std().item() - 1 / math.sqrt(65)) < 0.25 / math.sqrt(65)


def test_score_independent_of_padding_side_and_batch_size():
    """Reference §8 item 1: the same scores under left and right padding, batch 1 and batch 8."""
    rm, tok = load_reward_model("tiny", seed=0)
    runs = {(side, bs): score(rm, tok, PROMPTS, ANSWERS, batch_size=bs, side=side)
            for side in ("left", "right") for bs in (1, 8)}
    base = runs[("right", 1)]
    assert len(set(round(x, 3) for x in base)) > 1
    for key, vals in runs.items():
        assert vals == pytest.approx(base, abs=1e-5), key


def test_score_and_embed_reads_the_reward_and_the_response_mean_in_one_pass():
    """``score_and_embed`` gives the same rewards as ``score``, and features equal to the mean of the last
    hidden state over exactly the response tokens of a lone ``prompt + response`` pass (the prompt and
    the padding of a batch of 8 do not enter)."""
    from rlhfkit.models.reward import score_and_embed

    rm, tok = load_reward_model("tiny", seed=0)
    rewards, features = score_and_embed(rm, tok, PROMPTS, ANSWERS, batch_size=8)
    assert rewards.tolist() == pytest.approx(score(rm, tok, PROMPTS, ANSWERS, batch_size=8), abs=1e-5)
    for i in (0, 5):
        p, r = encode_prompt(tok, PROMPTS[i]), encode_response(tok, ANSWERS[i], PROMPTS[i])
        with torch.no_grad():
            hidden = rm.hidden(torch.tensor([p + r]), torch.ones(1, len(p) + len(r), dtype=torch.long))
        torch.testing.assert_close(features[i], hidden[0, len(p):].mean(0), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(features[i], hidden[0].mean(0), atol=1e-3)


def test_head_runs_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the backbone's matmuls run in bf16 but the fp32 head's does not: rewards are
    fp32 and equal ``w · h`` in fp32 (to 1e-6), not rounded to bf16's 8 significant bits, where rewards
    near 1 step by 1/128 and close pairs tie (a tie counts as wrong)."""
    rm, tok = load_reward_model("tiny", seed=0)
    ids = torch.tensor([encode_prompt(tok, PROMPTS[3]) + encode_response(tok, ANSWERS[3])])
    mask = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = rm.hidden(ids, mask)
        rewards = rm(ids, mask)[..., 0]
    assert rewards.dtype == torch.float32
    exact = hidden.float() @ rm.hf.score.weight[0]
    torch.testing.assert_close(rewards, exact, atol=1e-6, rtol=1e-6)
    assert not torch.equal(rewards, exact.bfloat16().float())  # bf16 rounding would show here


def test_prefix_sharing_equals_full_forward(tokenizer):
    """Packing a prompt once with both responses gives every response token the scores of a full
    ``prompt + response`` pass, and gradients flow through the shared prompt."""
    from rlhfkit.models.reward import pack_shared_prefix

    rm, tok = load_reward_model("tiny", seed=0)
    prompts = [encode_prompt(tok, p) for p in PROMPTS[:3]]
    resp = [[encode_response(tok, a), encode_response(tok, a + " Really, truly.")] for a in ANSWERS[:3]]
    ids, mask, pos, starts = pack_shared_prefix(prompts, resp, tok.pad_token_id)
    packed = rm(ids, mask, position_ids=pos)
    for b, (p, pair) in enumerate(zip(prompts, resp)):
        for k, r in enumerate(pair):
            alone = rm(torch.tensor([p + r]), torch.ones(1, len(p) + len(r), dtype=torch.long))
            s = starts[b][k]
            torch.testing.assert_close(packed[b, s: s + len(r)], alone[0, len(p):], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed[b, : len(p)], alone[0, : len(p)], atol=1e-5, rtol=1e-5)
    assert ids.shape[1] < max(len(p) + len(r) for p, pair in zip(prompts, resp) for r in pair) * 2
    packed[0, starts[0][1]].sum().backward()
    assert rm.hf.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_saved_rm_reloads_with_transformers_and_gives_identical_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm, tok = load_reward_model("tiny", seed=0)
    save_reward_model(rm, tok, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    ours = score(rm, tok, PROMPTS, ANSWERS, batch_size=8)
    seqs = [encode_prompt(tok, p) + encode_response(tok, a) for p, a in zip(PROMPTS, ANSWERS)]
    for side in ("left", "right"):  # transformers finds the last non-pad token from pad_token_id
        ids = pad(seqs, tok.pad_token_id, side)
        mask = pad([[1] * len(s) for s in seqs], 0, side)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
        assert theirs.tolist() == pytest.approx(ours, abs=1e-5)
    reloaded, _ = load_reward_model(str(tmp_path / "rm"))
    assert score(reloaded, tok, PROMPTS, ANSWERS) == pytest.approx(ours, abs=1e-6)
