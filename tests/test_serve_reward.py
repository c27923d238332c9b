"""`rlhfkit serve reward`: a real server in its own process, on loopback. OpenRLHF's contract, the
project's own route and reward source against it, bad input, auth, kill and restart, and load."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import statistics
import time
from pathlib import Path

import pytest

from conftest import ServerProcess, request

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


class Server(ServerProcess):
    """`rlhfkit serve reward` in a subprocess."""

    def __init__(self, model: Path, *flags: str, port: int | None = None, env: dict | None = None):
        super().__init__(["serve", "reward", "--model", str(model), *flags], "/health", port, env)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from rlhfkit.models.reward import load_reward_model, save_reward_model

    folder = tmp_path_factory.mktemp("rm") / "final"
    rm, tok = load_reward_model("tiny", seed=3)
    save_reward_model(rm, tok, folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_rm):
    s = Server(tiny_rm)
    yield s
    s.kill()


PROMPTS = [[{"role": "user", "content": f"Tell me about {w}."}] for w in ("cats", "the sea", "rain", "tea")]
RESPONSES = ["They purr.", "It is wide and salty and it moves with the tides.", "Wet.", "A hot drink, often with milk."]


def offline(model: Path, prompts, responses) -> list[float]:
    from rlhfkit.models.reward import load_reward_model, score

    rm, tok = load_reward_model(str(model))
    return score(rm, tok, prompts, responses, batch_size=2)


def test_openrlhf_payload_matches_rm_score(server, tiny_rm):
    """OpenRLHF's exact payload: the query is the conversation as one string (here the text `rm score`
    encodes for each pair); the reply has rewards, scores and extra_logs, equal to offline scoring."""
    from rlhfkit.models.reward import encode_pairs, load_reward_model

    _, tok = load_reward_model(str(tiny_rm))
    seqs, _ = encode_pairs(tok, PROMPTS, RESPONSES, 1024)
    queries = [tok.decode(s) for s in seqs]
    assert [tok(q, add_special_tokens=False)["input_ids"] for q in queries] == seqs  # the same tokens
    status, out = request(server.url + "/get_reward", {"query": queries, "prompts": [p[0]["content"] for p in PROMPTS],
                                                      "labels": [""] * 4})
    assert status == 200 and set(out) == {"rewards", "scores", "extra_logs"} and out["extra_logs"] == {}
    want = offline(tiny_rm, PROMPTS, RESPONSES)
    assert out["rewards"] == pytest.approx(want, abs=1e-5) and out["scores"] == out["rewards"]


def test_v1_score_and_the_http_reward_source(server, tiny_rm):
    """rlhfkit's own shape, as a batch and as one pair; and `--reward http://.../v1/score` (the reward
    source the RL stages, bon, label and eval policy use) gets the same rewards."""
    from rlhfkit.rollout.rewards import parse_reward

    want = offline(tiny_rm, PROMPTS, RESPONSES)
    status, out = request(server.url + "/v1/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert status == 200 and out["rewards"] == pytest.approx(want, abs=1e-5)
    status, one = request(server.url + "/v1/score", {"prompt": "Tell me about cats.", "response": "They purr."})
    assert status == 200 and one["rewards"] == pytest.approx(want[:1], abs=1e-5)
    source = parse_reward(f"{server.url}/v1/score", timeout=30, retries=1)
    assert source.score(PROMPTS, RESPONSES, [{}] * 4) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("name, body, raw, status", [
    ("malformed JSON", None, b'{"query": [', 422),
    ("query not a list", {"query": "text"}, None, 422),
    ("numbers for texts", {"query": [1, 2]}, None, 422),
    ("empty list", {"query": []}, None, 422),
    ("100,000 characters", {"query": ["word " * 20000]}, None, 413),
    ("10,000 texts", {"query": ["hi"] * 10000}, None, 413),
    ("invalid UTF-8", None, b'{"query": ["\xff\xfe bad"]}', 400),
    ("NUL byte", {"query": ["a\u0000b"]}, None, 422),
    ("empty text", {"query": [""]}, None, 422),
])
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_goes_on(server, name, body, raw, status):
    code, out = request(server.url + "/get_reward", body, raw=raw)
    assert code == status, (name, out)
    assert out.get("detail"), name
    ok, good = request(server.url + "/get_reward", {"query": ["Hello there."]})
    assert ok == 200 and len(good["rewards"]) == 1


@pytest.mark.parametrize("body", [{"prompts": ["a"], "responses": ["b", "c"]}, {"prompts": ["a"]},
                                  {"prompt": [{"role": "robot", "content": "x"}], "response": "y"},
                                  {"prompts": ["a"], "responses": ["b"], "prompt": "c", "response": "d"},
                                  {"prompts": ["a"], "responses": ["b"], "extra": 1}])
def test_v1_score_rejects_inconsistent_bodies(server, body):
    code, out = request(server.url + "/v1/score", body)
    assert code == 422 and out["detail"]


def test_bearer_token(tiny_rm):
    s = Server(tiny_rm, env={"RLHFKIT_SERVE_TOKEN": "s3cret"})
    try:
        body = {"query": ["Hello."]}
        assert request(s.url + "/health", None, method="GET")[0] == 200
        for route, payload in (("/get_reward", body), ("/v1/score", {"prompt": "a", "response": "b"})):
            assert request(s.url + route, payload)[0] == 401
            assert request(s.url + route, payload, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert request(s.url + route, payload, headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        s.kill()


def test_kill_and_restart_serves_the_same_rewards(tiny_rm):
    s = Server(tiny_rm)
    try:
        before = request(s.url + "/v1/score", {"prompts": PROMPTS, "responses": RESPONSES})[1]["rewards"]
        s.kill()
        with pytest.raises(OSError):
            request(s.url + "/health", None, method="GET")
        s.start()
        after = request(s.url + "/v1/score", {"prompts": PROMPTS, "responses": RESPONSES})[1]["rewards"]
        assert after == pytest.approx(before, abs=1e-6)
    finally:
        s.kill()


@pytest.mark.slow
def test_load_50_clients_bundled_model(tmp_path):
    """50 concurrent clients x 8 requests of 1-2 texts each against the bundled model's reward model:
    no errors, every reward equal to offline scoring of the same text (1e-4: batches pad differently),
    fewer forward groups than requests (dynamic batching), p50/p99 reported."""
    from rlhfkit.models.reward import load_reward_model, save_reward_model

    clients, per_client = 50, 8  # 400 requests: p99 over 400 latencies
    folder = tmp_path / "rm"
    rm, tok = load_reward_model("smollm2-135m-instruct", seed=0)
    save_reward_model(rm, tok, folder)
    del rm
    words = ["cats", "rain", "tea", "the sea", "trains", "maths", "music", "bread"]
    jobs = [[(f"Tell me about {words[(c + r + i) % 8]}.", f"Answer {i}: " + "it is nice " * (1 + (c * r + i) % 6))
             for i in range(1 + (c + r) % 2)] for c in range(clients) for r in range(per_client)]
    s = Server(folder)
    try:
        def client(c: int):
            out = []
            for r in range(per_client):
                pairs = jobs[c * per_client + r]
                t0 = time.perf_counter()
                code, body = request(s.url + "/v1/score", {"prompts": [p for p, _ in pairs], "responses": [x for _, x in pairs]})
                out.append((code, body, time.perf_counter() - t0))
            return out

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [x for part in pool.map(client, range(clients)) for x in part]
        wall = time.perf_counter() - t0
        batches = request(s.url + "/health", None, method="GET")[1]["batches"]
    finally:
        s.kill()
    assert [code for code, _, _ in results] == [200] * len(jobs)
    got = [v for _, body, _ in results for v in body["rewards"]]
    flat = [p for job in jobs for p in job]
    unique = sorted(set(flat))  # offline scoring of each distinct text once
    scored = dict(zip(unique, offline(folder, [[{"role": "user", "content": p}] for p, _ in unique], [x for _, x in unique])))
    assert got == pytest.approx([scored[p] for p in flat], abs=1e-4)
    latency = sorted(t for _, _, t in results)
    p50, p99 = statistics.median(latency), latency[int(0.99 * len(latency))]
    print(f"\nload: {len(jobs)} requests ({len(flat)} texts) in {wall:.1f} s = {len(flat) / wall:.1f} texts/s; "
          f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; {batches} forward groups")
    assert batches < len(jobs)


def test_http_reward_client_faults():
    """The reward source's client against a server that stalls, drops the connection, or answers 500
    twice and then succeeds: the timeout and the retries behave as configured, and the error after the
    last retry names the URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rlhfkit.errors import RemoteError
    from rlhfkit.rollout.rewards import RemoteReward

    plan: list[str] = []
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            mode = plan.pop(0) if plan else "ok"
            seen.append(mode)
            if mode == "stall":
                time.sleep(1.5)
            if mode == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status = 500 if mode == "500" else 200
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if status == 200:
                    self.wfile.write(json.dumps({"rewards": [1.0]}).encode())
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stalled answer
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1/score"
    try:
        plan[:] = ["500", "500"]
        assert RemoteReward(url, timeout=5, retries=2, backoff=0.01).score([[]], ["x"]) == [1.0]
        assert seen == ["500", "500", "ok"]
        seen.clear()
        plan[:] = ["500", "500"]
        with pytest.raises(RemoteError, match=rf"{url}: HTTP 500 \(after 2 attempt\(s\)\)"):
            RemoteReward(url, timeout=5, retries=1, backoff=0.01).score([[]], ["x"])
        plan[:] = ["stall", "stall"]
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match=rf"{url}: .*timed out.* \(after 2 attempt\(s\)\)"):
            RemoteReward(url, timeout=0.5, retries=1, backoff=0.01).score([[]], ["x"])
        assert time.perf_counter() - t0 < 1.4  # two 0.5 s timeouts, not the 1.5 s stall
        plan[:] = ["drop"]
        seen.clear()
        assert RemoteReward(url, timeout=5, retries=1, backoff=0.01).score([[]], ["x"]) == [1.0]
        assert seen == ["drop", "ok"]
    finally:
        server.shutdown()


def test_generated_requests_never_get_a_server_error(tiny_rm):
    """schemathesis generates request bodies for every operation of the app's OpenAPI schema, valid and
    invalid ones; none may get a 5xx, and the server answers a good request afterwards. (It found that
    an empty query crashed the forward pass with a 500: now a 422.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    server = Server(tiny_rm, "--max-texts", "32", "--max-tokens", "512")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/get_reward", "/v1/score", "/health"}
    statuses = []
    for op in operations:
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(base_url=server.url, timeout=120)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        check()
    try:
        assert len(statuses) > 40 and any(400 <= s < 500 for s in statuses)
        assert request(server.url + "/get_reward", {"query": ["Hello."]})[0] == 200
    finally:
        server.kill()


def test_stages_score_through_the_server(server, tiny_rm, tmp_path):
    """bon, label and pg with --reward pointing at the server: the same rewards as the model on disk."""
    from conftest import write_jsonl
    from rlhfkit.feedback.label import LabelConfig
    from rlhfkit.feedback.label import run as label
    from rlhfkit.train.best_of_n import BoNConfig
    from rlhfkit.train.best_of_n import run as bon
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as pg

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about {w}."} for w in "abcdefgh"])
    common = dict(model="tiny", train=str(prompts), max_new_tokens=4, output_dir=str(tmp_path / "runs"),
                  progress=False, reward_retries=0)
    url = f"{server.url}/v1/score"
    runs = {name: bon(BoNConfig(**common, reward=reward, n=2, name=f"bon-{name}"))
            for name, reward in (("http", url), ("disk", str(tiny_rm)))}
    scores = {name: [json.loads(x)["score"] for x in (r.path / "samples.jsonl").read_text().splitlines()]
              for name, r in runs.items()}
    assert scores["http"] == pytest.approx(scores["disk"], abs=1e-5)
    assert label(LabelConfig(**common, labeler="reward", reward=url, k=2, name="label")).manifest()["status"] == "finished"
    run = pg(PGConfig(**common, reward=url, batch_size=2, samples_per_prompt=2, micro_batch_size=4, max_steps=1,
                      eval_size=2, eval_prompts=2, name="pg"))
    assert run.manifest()["status"] == "finished"


def test_v1_score_returns_the_ood_flags_of_the_models_detector(tmp_path):
    """A reward model saved with an OOD detector (as rm train saves it): /v1/score returns a flag per
    response, equal to the detector's own verdict on offline features."""
    from rlhfkit.models.ood import OODDetector
    from rlhfkit.models.reward import embed, load_reward_model, save_reward_model

    rm, tok = load_reward_model("tiny", seed=4)
    folder = tmp_path / "rm"
    save_reward_model(rm, tok, folder)
    prompts = [[{"role": "user", "content": f"Tell me about thing {i}."}] for i in range(30)]
    responses = [f"Thing {i} is {'big' if i % 2 else 'small'} and {'red' if i % 3 else 'blue'}." for i in range(30)]
    detector = OODDetector.fit(embed(rm, tok, prompts, responses), seed=0, components=8)
    detector.save(folder / "ood.pt")
    probe = ["Thing 3 is big and blue.", "zzz qqq ### 0101 ¿¿¿ " * 8]
    want = detector.flag(embed(rm, tok, prompts[:2], probe)).tolist()
    s = Server(folder)
    try:
        code, out = request(s.url + "/v1/score", {"prompts": prompts[:2], "responses": probe})
        health = request(s.url + "/health", None, method="GET")[1]
    finally:
        s.kill()
    assert code == 200 and health["ood_detector"] is True
    assert out["ood"] == want and all(isinstance(x, bool) for x in out["ood"])
