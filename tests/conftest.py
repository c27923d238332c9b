from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLHFKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
PYTHON = sys.executable

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each worker, and every
# process it starts, gets its share of them as threads, set before torch is imported. Two torch
# processes of a full core count each on the same cores would wait on each other's threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _native_bf16() -> bool:
    from rlhfkit.platform.kernels import cpu_has_native_bf16

    return cpu_has_native_bf16()


# Whether this CPU has bf16 units. Elsewhere the stages route bf16 products through the fp32 kernels
# (rlhfkit.platform.kernels.bf16_products_through_fp32); a test that runs bf16 autocast itself, outside a stage,
# gets PyTorch's emulated kernels and uses fp32 there instead.
NATIVE_BF16 = _native_bf16()


# QLoRA's tests need bitsandbytes (the qlora extra)
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed (pip install 'rlhfkit[qlora]')")


def shared(relpath: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(f"third-party test data {path} is absent (expected ../shared/data beside the repo)")
    return path


# Model text that must stay inert wherever it is shown (the annotation pages, the report).
HOSTILE_TEXTS = [
    "<script>window.__pwned = 1; alert('xss')</script>",
    '<img src=x onerror="window.__pwned = 2; alert(2)">',
    '<a href="javascript:window.__pwned=3;alert(3)">click me</a>',
    "\u202eevil RTL override\u202c and then normal text",
    "A" * 25_000,
    "before NUL \x00 after NUL",
]


def chat(text: str) -> list[dict]:
    """A one-message chat prompt."""
    return [{"role": "user", "content": text}]


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


# --------------------------------------------------------------------- servers in their own process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rlhfkit <args> --port P`` in a subprocess, started and waited for until ``health`` answers 200;
    ``kill()`` sends SIGKILL."""

    def __init__(self, args: list[str], health: str, port: int | None = None, env: dict | None = None,
                 token: str | None = None):
        self.port = port or free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = health
        self.args = [PYTHON, "-m", "rlhfkit.cli", *args, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if request(self.url + self.health, None, method="GET", headers=self.auth())[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
        raise RuntimeError("server did not start within 120 s")

    def auth(self) -> dict:
        token = self.token or self.env.get("RLHFKIT_SERVE_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def request(url: str, body, method: str = "POST", headers: dict | None = None, raw: bytes | None = None):
    """(status, decoded JSON) for one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --------------------------------------------------------------------- PostgreSQL for the tests


def _pg_bin() -> Path | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's postgresql, which `make test` installs) on a free
    loopback port, for the session; its URL. Skipped with the reason when PostgreSQL is absent."""
    import pwd
    import shutil

    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; `make test` does this as root)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rlhfkit-pg-"))  # not under pytest's root-only folder
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chmod(base, 0o755)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        run_as = [shutil.which("runuser") or "/sbin/runuser", "-u", "postgres", "--"]
    port = free_port()
    for cmd in ([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                 f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"]):
        out = subprocess.run([*run_as, *cmd], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd[:1])} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
