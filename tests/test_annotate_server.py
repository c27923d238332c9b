"""The annotation server: auth on every route, CSRF, bad input, escaping, and many annotators at once
over HTTP against a running server on SQLite and on PostgreSQL, killed with SIGKILL halfway."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import pytest

pytest.importorskip("sqlalchemy", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
pytest.importorskip("starlette_csrf", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'rlhfkit[dev]')")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import HOSTILE_TEXTS, ServerProcess, chat  # noqa: E402
from rlhfkit.annotate.app import PUBLIC, create_app, route_table  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.db import Item, Judgement, open_db  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    db = open_db(f"sqlite:///{tmp_path / 'a.db'}")
    store.create_project(db, "p", "pairwise", 2, [{"prompt": chat(f"q{i}"), "responses": [f"x{i}", f"y{i}"]}
                                                  for i in range(5)])
    tokens = {name: store.add_user(db, name, role) for name, role in
              (("alice", "annotator"), ("bob", "annotator"), ("root", "admin"))}
    return db, tokens, TestClient(create_app(db))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def concrete(path: str) -> str:
    return (path.replace("{name}", "p").replace("{item_id}", "1").replace("{jid}", "1")
            .replace("{what}", "events"))


# ------------------------------------------------------------------------------ auth


def test_every_route_needs_a_token(setup):
    db, tokens, client = setup
    routes = route_table(client.app)
    assert len(routes) >= 20, routes  # the enumeration really found the app's routes
    checked = 0
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic abc"}):
            r = client.request(method, concrete(path), json={}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
        checked += 1
    assert checked == len(routes) - len(PUBLIC)
    # static files are public; nothing else is
    assert client.get("/static/app.js").status_code == 200


def test_annotators_are_refused_every_admin_route(setup):
    db, tokens, client = setup
    admin_routes = [(m, p) for m, p in route_table(client.app) if p.startswith(("/admin", "/api/admin"))]
    assert len(admin_routes) >= 6
    for method, path in admin_routes:
        r = client.request(method, concrete(path), json={"name": "mallory"}, headers=bearer(tokens["alice"]))
        assert r.status_code == 403, (method, path, r.status_code)
        ok = client.request(method, concrete(path), json={"name": f"new-{method}-{len(path)}"},
                            headers=bearer(tokens["root"]))
        assert ok.status_code in (200, 201), (method, path, ok.status_code, ok.text[:200])


def test_an_annotator_cannot_read_or_change_anothers_judgements(setup):
    db, tokens, client = setup
    a, b = bearer(tokens["alice"]), bearer(tokens["bob"])
    item = client.post("/api/projects/p/next", headers=a).json()["item"]
    j = client.post(f"/api/projects/p/items/{item['item']}/judgement", json={"preference": 1}, headers=a).json()
    assert client.get(f"/api/judgements/{j['id']}", headers=b).status_code == 403
    assert client.put(f"/api/judgements/{j['id']}", json={"preference": -1}, headers=b).status_code == 403
    assert client.get("/api/judgements", headers=b).json()["judgements"] == []
    # nor submit on an item they were not given, nor skip it
    assert client.post(f"/api/projects/p/items/{item['item']}/judgement", json={"preference": 1},
                       headers=b).status_code == 404
    assert client.get(f"/api/judgements/{j['id']}", headers=a).json()["answer"]["preference"] == 1
    assert client.put(f"/api/judgements/{j['id']}", json={"preference": -1}, headers=a).status_code == 200
    assert client.get(f"/api/judgements/{j['id']}", headers=bearer(tokens["root"])).status_code == 200


def test_a_disabled_user_is_locked_out_at_once(setup):
    db, tokens, client = setup
    assert client.get("/api/me", headers=bearer(tokens["bob"])).status_code == 200
    store.set_active(db, "bob", False)
    assert client.get("/api/me", headers=bearer(tokens["bob"])).status_code == 401


def test_browser_sessions_need_the_csrf_header_on_every_change(setup):
    db, tokens, client = setup
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    r = client.post("/login", data={"token": tokens["alice"]}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/").status_code == 200  # the session cookie works for pages
    csrf = client.cookies.get("csrftoken")
    assert csrf
    # a form post with the session cookie but without the CSRF header: refused, nothing changes
    refused = client.post("/api/projects/p/next")
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert client.post("/logout").status_code == 403
    assert client.post("/api/projects/p/next", headers={"X-CSRFToken": "forged"}).status_code == 403
    with db() as s:
        assert s.query(store.Assignment).count() == 0
    ok = client.post("/api/projects/p/next", headers={"X-CSRFToken": csrf})
    assert ok.status_code == 200 and ok.json()["item"]["project"] == "p"


# ------------------------------------------------------------------------------ bad input


def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(setup):
    db, tokens, client = setup
    a = bearer(tokens["alice"])
    item = client.post("/api/projects/p/next", headers=a).json()["item"]["item"]
    url = f"/api/projects/p/items/{item}/judgement"
    cases = [
        (client.post(url, content=b"{not json", headers={**a, "Content-Type": "application/json"}), 422, "JSON"),
        (client.post(url, json={"preference": "left"}, headers=a), 422, "preference"),
        (client.post(url, json={"preference": True}, headers=a), 422, "preference"),
        (client.post(url, json={"preference": 9}, headers=a), 422, "preference: 9 is outside -3..3"),
        (client.post(url, json={"rating": 3}, headers=a), 422, "rating: not a field of the pairwise task"),
        (client.post(url, json={"preference": 1, "reason": "a\x00b"}, headers=a), 422, "NUL"),
        (client.post(url, json={"preference": 1, "extra": 1}, headers=a), 422, "extra"),
        (client.post(url, json={"preference": 1, "reason": "x" * 20_001}, headers=a), 422, "reason"),
        (client.post(url, content=b"x" * 3_000_000, headers={**a, "Content-Type": "application/json"}), 413, "MB"),
        (client.post("/api/projects/nope/next", headers=a), 404, "no project named 'nope'"),
        (client.post("/api/projects/p/items/99999/judgement", json={"preference": 1}, headers=a), 404, "not given"),
        (client.post("/api/projects/p/items/abc/judgement", json={"preference": 1}, headers=a), 422, "item_id"),
        (client.post(f"/api/projects/p/items/{item}/skip", json={"flag": "yes"}, headers=a), 422, "flag"),
        (client.post("/api/admin/users", json={"name": ""}, headers=bearer(tokens["root"])), 422, "name"),
        (client.post("/api/admin/users", json={"name": "alice"}, headers=bearer(tokens["root"])), 409, "exists"),
        (client.post("/api/admin/users", json={"name": "eve", "role": "god"}, headers=bearer(tokens["root"])), 422,
         "role"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (words, r.status_code, r.text[:300])
        assert words.lower() in r.json()["detail"].lower() or words.lower() in r.text.lower(), (words, r.text[:300])
    assert client.get("/api/health", headers=a).status_code == 200
    assert client.post(url, json={"preference": 1}, headers=a).status_code == 201  # and still takes good input


def test_model_text_is_escaped_in_every_page(tmp_path):
    db = open_db(f"sqlite:///{tmp_path / 'a.db'}")
    store.create_project(db, "h", "pairwise", 1, [{"prompt": chat(HOSTILE_TEXTS[0]), "responses": [HOSTILE_TEXTS[1], HOSTILE_TEXTS[2]]}],
                         guidelines="Be kind. <script>alert('g')</script> [x](javascript:alert(1))")
    token = store.add_user(db, "ann", "annotator")
    client = TestClient(create_app(db))
    client.post("/login", data={"token": token})
    html = client.get("/p/h").text
    assert "<script>window" not in html and "<img src=x" not in html and '<a href="javascript' not in html
    assert "&lt;script&gt;window.__pwned" in html and "&lt;img src=x onerror=" in html
    assert "<script>alert('g')" not in html and 'href="javascript' not in html  # the guidelines' Markdown too
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']  # no inline script
    csp = client.get("/p/h").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


# ------------------------------------------------------------------------------ many annotators, one crash


def pg_database(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load_with_a_crash(tmp_path, db_arg: str, annotators=50, each=20, overlap=3):
    """``annotators`` threads, each a person judging ``each`` items over HTTP with retries; the server is
    killed with SIGKILL once half the judgements are acknowledged, and restarted on the same port."""
    folder = tmp_path / "ann"
    from rlhfkit.people.db import database_url

    db = open_db(database_url(db_arg, folder))
    n_items = annotators * each // overlap + 40
    store.create_project(db, "load", "pairwise", overlap, [{"prompt": chat(f"q{i}"), "responses": [f"a{i}", f"b{i}"]}
                                                           for i in range(n_items)])
    tokens = [store.add_user(db, f"ann{i:02d}") for i in range(annotators)]
    admin = store.add_user(db, "admin", "admin")
    server = ServerProcess(["annotate", "serve", "--dir", str(folder), *(["--db", db_arg] if db_arg else [])],
                           "/api/health", token=admin)
    acked, conflicts, errors = [], [], []
    latency = {"next": [], "judgement": []}
    lock = threading.Lock()
    restarting = threading.Event()
    deadline = time.time() + 240

    def call(client, path, body):
        """One request, retried while the server is down; (status, JSON)."""
        while time.time() < deadline:
            t0 = time.perf_counter()
            try:
                r = client.post(path, json=body)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if r.status_code >= 500:
                time.sleep(0.1)
                continue
            if not restarting.is_set():
                latency[path.rsplit("/", 1)[-1]].append(time.perf_counter() - t0)
            return r.status_code, r.json()
        raise TimeoutError(path)

    def annotator(token, seed):
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, headers=bearer(token), timeout=60) as client:
            done = 0
            while done < each:
                status, got = call(client, "/api/projects/load/next", None)
                if status != 200 or got["item"] is None:
                    errors.append(("next", status, got))
                    return
                item = got["item"]["item"]
                status, j = call(client, f"/api/projects/load/items/{item}/judgement",
                                 {"preference": rng.choice([-3, -2, -1, 1, 2, 3])})
                if status in (200, 201):
                    with lock:
                        acked.append((j["id"], j["item"], j["annotator"]))
                    done += 1
                elif status == 409:
                    conflicts.append(j)
                else:
                    errors.append(("judgement", status, j))
                    return

    threads = [threading.Thread(target=annotator, args=(t, i)) for i, t in enumerate(tokens)]
    t0 = time.time()
    try:
        for t in threads:
            t.start()
        while len(acked) < annotators * each // 2 and time.time() < deadline:
            time.sleep(0.01)
        restarting.set()
        at_kill = len(acked)
        server.kill()
        server.start()
        restarting.clear()
        for t in threads:
            t.join(timeout=max(1, deadline - time.time()))
    finally:
        server.kill()
    seconds = time.time() - t0
    with db() as s:
        rows = {(j.id, j.item_id, j.user_id) for j in s.query(Judgement)}
        names = {u.id: u.name for u in s.query(store.User)}
        items = {i.id: i.n_submitted for i in s.query(Item)}
        per_item = {}
        for _, item, _ in rows:
            per_item[item] = per_item.get(item, 0) + 1
    stored = {(jid, item, names[uid]) for jid, item, uid in rows}
    report = {"annotators": annotators, "each": each, "overlap": overlap, "acknowledged": len(acked),
              "acknowledged_before_kill": at_kill, "stored": len(stored), "conflicts": len(conflicts),
              "seconds": round(seconds, 1),
              **{f"{k}_p50_ms": round(1000 * percentile(v, 0.5), 1) for k, v in latency.items()},
              **{f"{k}_p99_ms": round(1000 * percentile(v, 0.99), 1) for k, v in latency.items()}}
    print("\nannotate load:", json.dumps(report))
    assert not errors, errors[:5]
    assert len(acked) == annotators * each
    assert set(acked) == stored, "an acknowledged judgement is missing, or one was stored unacknowledged"
    assert len({(item, who) for _, item, who in acked}) == len(acked), "a duplicated judgement"
    assert all(items[i] == c for i, c in per_item.items()) and max(items.values()) <= overlap
    complete = [i for i, c in items.items() if c >= overlap]
    assert complete and all(per_item[i] == overlap for i in complete)
    assert not conflicts
    assert 0 < at_kill < annotators * each
    return report


@pytest.mark.slow
def test_fifty_annotators_at_once_on_sqlite_with_a_crash(tmp_path):
    load_with_a_crash(tmp_path, "")


@pytest.mark.slow
def test_fifty_annotators_at_once_on_postgresql_with_a_crash(tmp_path, postgres_url):
    load_with_a_crash(tmp_path, pg_database(postgres_url, "load_test"))


@pytest.mark.slow
def test_postgresql_schema_equals_the_models(postgres_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from rlhfkit.people.db import Base, connect, database_url

    url = database_url(pg_database(postgres_url, "schema_test"), "")
    open_db(url)
    with connect(url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    # and NUL bytes in model text survive PostgreSQL, which refuses them in text columns
    db = open_db(url)
    store.create_project(db, "nul", "likert", 1, [{"prompt": chat("q"), "responses": [HOSTILE_TEXTS[5]]}])
    with db() as s:
        assert s.query(Item).one().responses == [HOSTILE_TEXTS[5]]
