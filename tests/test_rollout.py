"""The sampler and the teacher-forced logprobs that must match it (reference §8 items 4, 10, 11), and
the reward sources."""

from __future__ import annotations

import pytest
import torch

from conftest import json_server
from rlhfkit.data.template import encode_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.rewards import (
    CompositeReward,
    RemoteReward,
    RuleReward,
    exact_answer,
    final_number,
    parse_reward,
    repetition_rate,
)
from rlhfkit.rollout.sampler import draw, filter_logits, response_logprobs, sample

PROMPTS = ["What is 2+2?", "Write one sentence about the sea and the wind at night.", "Hi"]


@pytest.fixture(scope="module")
def tiny():
    from rlhfkit.models import load_causal_lm

    model, tok = load_causal_lm("tiny", seed=3)
    return model, tok


def _ids(tok, prompts=PROMPTS):
    return [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]


def test_sampler_logprobs_equal_teacher_forced_at_temperature(tiny):
    """At T = 0.7, with left-padded prompts of different lengths, the trainer's recomputed logprobs of
    the sampled tokens equal the sampler's within 1e-5 (fp32), and are 0 on padding. Recomputing at
    T = 1 instead differs by far more: the test can tell the temperature apart (reference §8 item 4)."""
    model, tok = tiny
    ro = sample(model, _ids(tok), tok.pad_token_id, tok.eos_token_id, max_new_tokens=12, temperature=0.7,
                generator=torch.Generator().manual_seed(0))
    assert ro.prompt_ids.shape[0] == 3 and ro.response_ids.shape[1] <= 12
    with torch.no_grad():
        lp = response_logprobs(model, ro, 0.7)
        lp1 = response_logprobs(model, ro, 1.0)
    torch.testing.assert_close(lp, ro.logprobs, atol=1e-5, rtol=0)
    assert (lp1 - ro.logprobs).abs().max() > 1e-2
    assert (lp[ro.response_mask == 0] == 0).all()


def test_left_padded_batch_equals_each_prompt_alone(tiny):
    """Greedy continuations (and their logprobs) in a left-padded batch equal each prompt sampled alone:
    position ids skip the padding in prefill and in every decoding step (reference §8 item 11)."""
    model, tok = tiny
    ids = _ids(tok)
    batch = sample(model, ids, tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
    for i, p in enumerate(ids):
        alone = sample(model, [p], tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
        n = int(alone.response_mask.sum())
        assert batch.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


def test_stops_at_eos_and_pads_after(tiny):
    """min_new_tokens = 3 forbids EOS before token 3; once a row emits EOS it is done: the EOS keeps
    mask 1, everything after is pad with mask 0 and logprob 0."""
    model, tok = tiny
    eos = tok.eos_token_id
    # make EOS overwhelmingly likely by biasing the LM head
    head = model.lm_head.weight
    saved = head.data[eos].clone()
    head.data[eos] = model.model.embed_tokens.weight.data.mean(0) * 0 + 5.0
    try:
        ro = sample(model, _ids(tok), tok.pad_token_id, eos, max_new_tokens=10, temperature=1.0, min_new_tokens=3,
                    generator=torch.Generator().manual_seed(1))
    finally:
        head.data[eos] = saved
    for row, m, lp, done in zip(ro.response_ids, ro.response_mask, ro.logprobs, ro.eos):
        n = int(m.sum())
        assert n >= 4 and bool(done)
        assert row[n - 1].item() == eos and eos not in row[: n - 1].tolist()
        assert (row[n:] == tok.pad_token_id).all() and (m[n:] == 0).all() and (lp[n:] == 0).all()


def test_top_k_and_top_p_filters():
    """logits [3, 2, 1, 0] -> probs [0.644, 0.237, 0.087, 0.032]. top_k=2 keeps the first two.
    top_p=0.7 keeps {0, 1} (0.644 < 0.7, then 0.881 covers it); top_p=0.5 keeps only the first."""
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(x, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(x, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(x, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(x[:, [2, 0, 3, 1]], top_p=0.7)).tolist() == [[False, True, False, True]]


def test_bundled_model_sampler_matches_trainer(bundled):
    """The same on the real model: 4 prompts, 16 tokens at T = 0.7."""
    model, tok = bundled
    ro = sample(model, _ids(tok, PROMPTS + ["Name a colour."]), tok.pad_token_id, tok.eos_token_id, max_new_tokens=16,
                temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = response_logprobs(model, ro, 0.7)
    torch.testing.assert_close(lp, ro.logprobs, atol=2e-4, rtol=0)


def test_draw_samples_the_categorical_exactly():
    """Inverse-CDF sampling: 200,000 draws from [0.5, 0.3, 0.2, 0] land within 4 standard errors of
    each probability (SE = sqrt(p(1-p)/n) <= 0.0012), never on the zero-probability token, and the same
    generator seed gives the same draws."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(200_000, 4)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    se = (probs[0] * (1 - probs[0]) / len(tokens)).sqrt()
    assert ((freq - probs[0]).abs() <= 4 * se).all() and freq[3] == 0, freq
    assert torch.equal(tokens[:100], draw(probs[:100], torch.Generator().manual_seed(0)))


def test_draw_in_blocks_inverts_the_whole_cdf():
    """The two-level inversion (block sums, then inside the block) picks the token one running sum over the
    row picks: equal on 20,000 rows of float64 weights (no rounding between the two orders), for a vocabulary
    that is not a multiple of the block; and over a 1,000-token vocabulary with mass in three blocks, the
    frequencies are within 4 SE and no zero-probability token is ever drawn."""
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(20_000, 1000, generator=gen, dtype=torch.float64) ** 8  # unnormalised, uneven
    u = torch.rand(20_000, 1, generator=torch.Generator().manual_seed(2)).double()  # the draw's own u
    cdf = weights.cumsum(-1)
    whole = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    blocked = draw(weights, torch.Generator().manual_seed(2), block=64)
    assert torch.equal(blocked, whole)
    probs = torch.zeros(100_000, 1000)
    probs[:, [3, 300, 999]] = torch.tensor([0.2, 0.5, 0.3])
    tokens = draw(probs, torch.Generator().manual_seed(0))
    assert set(tokens.unique().tolist()) == {3, 300, 999}
    freq = torch.bincount(tokens, minlength=1000)[[3, 300, 999]].float() / len(tokens)
    p = torch.tensor([0.2, 0.5, 0.3])
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / len(tokens)).sqrt()).all(), freq


def test_draw_never_takes_a_zero_probability_token_at_the_end_of_the_mass():
    """u at the very end of the mass (a draw of 1 - 2^-24, the largest float32 below 1): the last entry with
    positive probability, not the zeros after it, in the last block with mass or inside it."""
    probs = torch.zeros(2, 1000)
    probs[0, :5] = 0.2  # mass in the first block only
    probs[1, 250:260] = 0.1  # mass ending inside a block
    real_rand = torch.rand
    try:
        torch.rand = lambda *shape, **kw: torch.full(shape if not isinstance(shape[0], tuple) else shape[0], 1 - 2 ** -24)
        tokens = draw(probs, block=256)
    finally:
        torch.rand = real_rand
    assert tokens.tolist() == [4, 259]


def test_shared_prompts_and_prefix_compute_what_each_prompt_alone_does(tiny):
    """Rows that repeat a prompt (k samples) are prefilled once and the chat template's shared system
    turn once for the batch: greedy continuations and logprobs still equal each prompt sampled alone."""
    model, tok = tiny
    ids = _ids(tok)
    assert len({tuple(p[:8]) for p in ids}) == 1  # the template gives these prompts a shared prefix
    rows = [ids[0], ids[1], ids[0], ids[2], ids[1]]
    batch = sample(model, rows, tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
    for i, p in enumerate(rows):
        alone = sample(model, [p], tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
        n = int(alone.response_mask.sum())
        assert batch.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


def test_hf_engine_under_bf16_autocast(tiny):
    """Regression: under CPU bf16 autocast (mixed_precision: bf16, as the quickstart runs) the packed fp32
    kernels would hand fp32 keys to a bf16 KV cache (index_copy_ dtype error). The engine runs the plain
    kernels there and samples what the plain sampler does."""
    from rlhfkit.rollout.engine import SamplingParams, make_engine

    model, tok = tiny
    engine = make_engine("hf", model, torch.device("cpu"))
    params = SamplingParams(tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = engine.generate(_ids(tok), params)
        plain = sample(model, _ids(tok), tok.pad_token_id, tok.eos_token_id, max_new_tokens=8, temperature=0)
    assert torch.equal(got.response_ids, plain.response_ids)


def test_packed_cpu_kernels_follow_the_live_weights(tiny):
    """The hf engine decodes through weights packed for oneDNN: its greedy tokens equal the plain
    sampler's and its logprobs the trainer's (within 1e-4). After an optimiser step changes the weights
    in place, the packed copies are remade: the engine samples from the new weights, not the old."""
    from rlhfkit.rollout.engine import SamplingParams, make_engine

    model, tok = tiny
    engine = make_engine("hf", model, torch.device("cpu"))
    params = SamplingParams(tok.pad_token_id, tok.eos_token_id, max_new_tokens=10, temperature=0)
    before = engine.generate(_ids(tok), params)
    assert engine.packed, "no weight was packed: the fast CPU path did not run"
    plain = sample(model, _ids(tok), tok.pad_token_id, tok.eos_token_id, max_new_tokens=10, temperature=0)
    assert torch.equal(before.response_ids, plain.response_ids)
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(model, before, 1.0), before.logprobs, atol=1e-4, rtol=0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        model.train()
        logits = model(input_ids=before.input_ids).logits
        logits[..., 7].mean().neg().backward()  # push every position towards token 7
        opt.step()
        model.eval()
        after = engine.generate(_ids(tok), params)
        fresh = sample(model, _ids(tok), tok.pad_token_id, tok.eos_token_id, max_new_tokens=10, temperature=0)
        assert not torch.equal(after.response_ids, before.response_ids)
        assert torch.equal(after.response_ids, fresh.response_ids)
    finally:
        model.load_state_dict(saved)


def test_packed_groups_give_the_logits_of_separate_rows(tiny):
    """The k samples of a prompt packed in one row (prompt once, responses side by side, each seeing only
    the prompt and itself) give every response token the logits it gets in its own left-padded row, in
    fp32 within 1e-5, and the same gradient: prompts of different lengths, responses that stop at EOS
    at different lengths. Rows that do not come in groups sharing their prompt are refused."""
    from rlhfkit.rollout.sampler import pack_groups, response_logits

    model, tok = tiny
    ids = _ids(tok)
    rows = [ids[0]] * 3 + [ids[1]] * 3 + [ids[2]] * 3
    ro = sample(model, rows, tok.pad_token_id, tok.eos_token_id, max_new_tokens=10, temperature=1.0,
                generator=torch.Generator().manual_seed(1))
    for i in range(len(rows)):  # responses that ended at different lengths (the tiny model rarely says EOS)
        ro.response_mask[i, 3 + i % 7:] = 0
        ro.response_ids[i, 3 + i % 7:] = tok.pad_token_id
    lengths = ro.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1 and len({len(p) for p in ids}) == 3  # the test covers both
    mask = ro.response_mask.bool()
    a = response_logits(model, ro, 0.7)
    b = response_logits(model, ro, 0.7, group=3)
    torch.testing.assert_close(b[mask], a[mask], atol=1e-5, rtol=0)
    ga = torch.autograd.grad((a.log_softmax(-1)[..., 5] * mask).sum(), model.lm_head.weight)[0]
    gb = torch.autograd.grad((b.log_softmax(-1)[..., 5] * mask).sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(gb, ga, atol=1e-4, rtol=1e-4)
    packed, _, _, _ = pack_groups(ro, 3)
    assert packed.shape[0] == 3 and packed.shape[1] < ro.input_ids.numel() / 3  # the prompt once per group
    with pytest.raises(ValueError, match="share their prompt"):
        pack_groups(ro.select(torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])), 3)


def test_onednn_linear_equals_f_linear_forward_and_backward(tiny):
    """The CPU training kernels (oneDNN in place of MKL for every fp32 F.linear): the model's logits, the
    input gradient and the weight and bias gradients equal plain PyTorch's within float rounding; under
    bf16 autocast F.linear runs as it is."""
    from rlhfkit.platform.kernels import OneDNNLinear

    x = torch.randn(2, 7, 48, requires_grad=True)
    lin = torch.nn.Linear(48, 32)
    ref = lin(x)
    gx, gw, gb = torch.autograd.grad((ref * ref).sum(), (x, lin.weight, lin.bias))
    with OneDNNLinear():
        out = lin(x)
        hx, hw, hb = torch.autograd.grad((out * out).sum(), (x, lin.weight, lin.bias))
    for got, want in ((out, ref), (hx, gx), (hw, gw), (hb, gb)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model, tok = tiny
    ids = torch.tensor([_ids(tok)[1]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with OneDNNLinear():
            fast = model(input_ids=ids).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_plain = model(input_ids=ids).logits
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(auto, auto_plain)


# ------------------------------------------------------------------------------------ rewards


def test_rule_reward_terms():
    """Seed 004's rule: keywords (fraction present), banned words (count), a length window.
    'Python is great for data' (5 words): keywords python+data -> 2/2 = 1; no banned; window [3, 10] -> 0: r = 1.
    'I hate this' : 0 keywords, 1 banned -> -1; 3 words in window: r = -1.
    20 words of 'python': keyword 1/2, length (20 - 10)/10 = 1 -> r = 0.5 - 1 = -0.5."""
    rule = RuleReward(keywords=["python", "data"], banned=["hate"], min_words=3, max_words=10)
    texts = ["Python is great for data", "I hate this", " ".join(["python"] * 20)]
    assert rule.score([[]] * 3, texts, [{}] * 3) == pytest.approx([1.0, -1.0, -0.5])


def test_repetition_and_exact_answer():
    """'a b c a b c' has 4 trigrams, 3 distinct -> repetition 0.25. GSM8K answers: '#### 1,234' -> '1234';
    'so the answer is 18.' -> '18'; the last number otherwise."""
    assert repetition_rate("a b c a b c") == pytest.approx(0.25)
    assert final_number("blah 3 + 4 = 7 #### 1,234") == "1234"
    assert final_number("3 eggs, so the answer is 18.") == "18"
    assert exact_answer("She makes 9 * 2 = 18 dollars.", "Janet ... \nA: 18") == 1.0
    assert exact_answer("She makes 16 dollars.", "#### 18") == 0.0
    rule = RuleReward(answer_field="answer")
    assert rule.score([[]], ["It is 18"], [{"answer": "#### 18"}]) == [1.0]
    with pytest.raises(ValueError, match="no field 'answer'"):
        rule.score([[]], ["18"], [{"question": "x"}])


def test_remote_reward_retries_and_composite(tmp_path):
    """A local HTTP scorer (reward = response length) that fails once with 503: the client retries and
    gets [2, 5]. A composite 0.5*remote + 2*rule sums them. A dead server is an error naming it."""
    calls = []

    def respond(body):
        calls.append(body)
        if len(calls) == 1:  # the first request fails: the client must retry
            return 503, None
        return 200, {"rewards": [float(len(r)) for r in body["responses"]]}

    with json_server(respond) as base:
        url = f"{base}/score"
        remote = RemoteReward(url, timeout=5, retries=2, backoff=0.01)
        assert remote.score([[], []], ["ab", "hello"], [{}, {}]) == [2.0, 5.0]
        rule = tmp_path / "r.yaml"
        rule.write_text("keywords: [hello]\n")
        comp = parse_reward(f"0.5*{url} + 2*rule:{rule}")
        assert isinstance(comp, CompositeReward) and len(comp.parts) == 2
        assert comp.score([[], []], ["ab", "hello"], [{}, {}]) == pytest.approx([1.0, 4.5])
    with pytest.raises(RuntimeError, match="127.0.0.1"):
        RemoteReward(url, timeout=0.5, retries=1, backoff=0.01).score([[]], ["x"], [{}])


def test_reward_spec_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("keywordz: [x]\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown rule field"):
        parse_reward(f"rule:{bad}")
    with pytest.raises(ConfigError, match="not found"):
        parse_reward(str(tmp_path / "no-such-rm"))
