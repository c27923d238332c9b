"""`rlhfkit serve policy`: the OpenAI chat API on the bundled model, in its own process, driven by the
`openai` client (plain and streaming), rlhfkit's HTTP judge, bad input and auth."""

from __future__ import annotations

import pytest
import torch

from conftest import ServerProcess, request

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def policy_server():
    s = ServerProcess(["serve", "policy", "--model", "smollm2-135m-instruct", "--name", "smol", "--max-tokens", "64"],
                      "/v1/models")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def client(policy_server):
    return openai.OpenAI(base_url=policy_server.url + "/v1", api_key="unused", max_retries=0)


def greedy_offline(max_new_tokens: int) -> str:
    from rlhfkit.data.template import encode_prompt
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.engine import SamplingParams, make_engine

    model, tok = load_causal_lm("smollm2-135m-instruct")
    engine = make_engine("hf", model.eval(), torch.device("cpu"))
    ro = engine.generate([encode_prompt(tok, MESSAGES)], SamplingParams(tok.pad_token_id, tok.eos_token_id,
                                                                         max_new_tokens=max_new_tokens, temperature=0))
    return tok.decode(ro.response_ids[0][ro.response_mask[0].bool()], skip_special_tokens=True)


def test_models_and_a_greedy_completion_match_the_engine(client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    out = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=24, n=2,
                                         logprobs=True)
    want = greedy_offline(24)
    assert [c.message.content for c in out.choices] == [want, want]  # greedy: both choices the same
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens > 0
    lps = [t.logprob for t in out.choices[0].logprobs.content]
    assert lps and all(lp <= 1e-6 for lp in lps)
    assert "".join(t.token for t in out.choices[0].logprobs.content).strip() == want.strip()


def test_streaming_gives_the_same_text_token_by_token(client):
    stream = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=24, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
    assert "".join(pieces) == greedy_offline(24) and len(pieces) > 3 and finish in ("stop", "length")


def test_stop_string_and_max_tokens(client):
    full = greedy_offline(24)
    word = full.split()[1]
    out = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=24, stop=[word])
    assert out.choices[0].message.content == full[: full.find(word)] and out.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    sampled = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=1.0, top_p=0.9, max_tokens=8,
                                             n=3, seed=5)
    again = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=1.0, top_p=0.9, max_tokens=8,
                                           n=3, seed=5)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]


def test_rlhfkit_http_judge_against_the_server(policy_server):
    from rlhfkit.feedback.judge import HTTPJudge, judge_pairs

    judge = HTTPJudge(policy_server.url + "/v1", "smol", max_new_tokens=16)
    out = judge_pairs(judge, [MESSAGES], ["Red, green, blue."], ["No."])
    assert out["n"] == 1 and len(out["answers"][0]) == 2 and all(isinstance(a, str) for a in out["answers"][0])


@pytest.mark.parametrize("body, status", [
    ({"messages": []}, 422), ({"messages": "hi"}, 422), ({"messages": MESSAGES, "n": 99}, 422),
    ({"messages": MESSAGES, "max_tokens": 10_000}, 422), ({"messages": MESSAGES, "temperature": -1}, 422),
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, 422), ({"messages": MESSAGES, "model": "other"}, 404),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 413),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 422),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(policy_server, body, status):
    code, out = request(policy_server.url + "/v1/chat/completions", body)
    assert code == status and out.get("detail"), out
    ok, good = request(policy_server.url + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert ok == 200 and good["choices"][0]["message"]["role"] == "assistant"


def test_token_guards_every_route():
    s = ServerProcess(["serve", "policy", "--model", "tiny", "--max-tokens", "4"], "/v1/models",
                      env={"RLHFKIT_SERVE_TOKEN": "s3cret"})
    try:
        for path, body, method in (("/v1/models", None, "GET"), ("/v1/chat/completions", {"messages": MESSAGES}, "POST")):
            assert request(s.url + path, body, method=method)[0] == 401
            assert request(s.url + path, body, method=method, headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        s.kill()


def test_eval_policy_with_the_server_as_judge(tmp_path):
    """`eval policy --judge-url` against `serve policy` (the tiny model judges; its answers are rarely
    parsable, so what is checked is that the judge was asked both orders and answered)."""
    import json

    from conftest import write_jsonl
    from rlhfkit.eval.policy import EvalPolicyConfig
    from rlhfkit.eval.policy import run as evaluate

    s = ServerProcess(["serve", "policy", "--model", "tiny", "--max-tokens", "256"], "/v1/models")
    try:
        rule = tmp_path / "r.yaml"
        rule.write_text("max_words: 4\n")
        prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}."} for w in "abc"])
        run = evaluate(EvalPolicyConfig(model="tiny", reference="tiny", eval=str(prompts), reward=f"rule:{rule}",
                                        judge_url=s.url + "/v1", max_new_tokens=4, output_dir=str(tmp_path / "runs"),
                                        name="ev", progress=False))
    finally:
        s.kill()
    judge = json.loads((run.path / "eval.json").read_text())["judge"]
    assert set(judge) == {"win_rate", "consistency", "ties", "unparsable"} and 0 <= judge["win_rate"] <= 1
