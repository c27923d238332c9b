from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLHFKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
PYTHON = sys.executable


def shared(relpath: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(f"third-party test data {path} is absent (expected ../shared/data beside the repo)")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from rlhfkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def bundled():
    from rlhfkit.models import load_causal_lm

    return load_causal_lm("smollm2-135m-instruct")


@pytest.fixture
def demos(tmp_path) -> Path:
    """40 short demonstrations of varying length."""
    rows = [{"prompt": f"Count to {i % 7 + 1}.", "response": " ".join(str(k) for k in range(1, i % 7 + 2))}
            for i in range(40)]
    return write_jsonl(tmp_path / "demos.jsonl", rows)


@contextlib.contextmanager
def json_server(respond):
    """A local HTTP server for the duration of the block; each POST's JSON body goes to
    ``respond(body) -> (status, answer dict or None)``. Yields its base URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            status, answer = respond(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if answer is not None:
                self.wfile.write(json.dumps(answer).encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
