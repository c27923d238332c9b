"""Reward-server throughput: dynamic batching against one request at a time, side by side in one run.

The same server (`rlhfkit serve reward`, its own process, on loopback) twice: with ``--batch-wait-ms
5`` (requests arriving together are scored together, cut at ``--batch-tokens``) and with
``--batch-wait-ms 0`` (each request is scored alone). 50 concurrent clients send 20 requests each of
1-4 (prompt, response) pairs to ``/v1/score``. Reports texts per second, p50 and p99 latency, the
forward groups the server ran, and the throughput ratio. The reward model is the bundled model with
an untrained head (the throughput does not depend on the head's weights).

    .venv/bin/python bench/serve.py --clients 50 --requests 20
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cats", "rain", "tea", "the sea", "trains", "maths", "music", "bread"]


def post(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def serve(model: Path, wait_ms: float, batch_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "serve", "reward", "--model", str(model), "--port",
                             str(port), "--batch-wait-ms", str(wait_ms), "--batch-tokens", str(batch_tokens)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            post(url + "/health")
            return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def load(url: str, clients: int, requests: int) -> dict:
    def client(c: int) -> list[float]:
        times = []
        for r in range(requests):
            n = 1 + (c + r) % 4
            body = {"prompts": [f"Tell me about {WORDS[(c + r + i) % 8]}." for i in range(n)],
                    "responses": [f"Answer {i}: " + "it is nice " * (1 + (c * r + i) % 6) for i in range(n)]}
            t0 = time.perf_counter()
            post(url + "/v1/score", body)
            times.append(time.perf_counter() - t0)
        return times

    texts = sum(1 + (c + r) % 4 for c in range(clients) for r in range(requests))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latency = sorted(t for part in pool.map(client, range(clients)) for t in part)
    wall = time.perf_counter() - t0
    return {"requests": len(latency), "texts": texts, "seconds": round(wall, 2), "texts_per_s": round(texts / wall, 1),
            "p50_ms": round(1000 * statistics.median(latency)), "p99_ms": round(1000 * latency[int(0.99 * len(latency))]),
            "forward_groups": post(url + "/health")["batches"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    args = ap.parse_args()
    from rlhfkit.models.reward import load_reward_model, save_reward_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "rm"
        rm, tok = load_reward_model("smollm2-135m-instruct", seed=0)
        save_reward_model(rm, tok, model)
        del rm
        results = {}
        for name, wait in (("dynamic batching (5 ms)", 5.0), ("one request at a time", 0.0)):
            proc, url = serve(model, wait, args.batch_tokens)
            try:
                results[name] = load(url, args.clients, args.requests)
            finally:
                proc.kill()
                proc.wait()
            print(json.dumps({"server": name, **results[name]}), flush=True)
    a, b = results.values()
    print(json.dumps({"throughput_ratio": round(a["texts_per_s"] / b["texts_per_s"], 2)}))


if __name__ == "__main__":
    main()
