"""The annotation web app (FastAPI): server-rendered pages for people, a JSON API for programs.

Every route but the login page and the static files needs a token: ``Authorization: Bearer <token>``
for programs, or the session cookie a browser gets by logging in with its token (HttpOnly,
SameSite=Strict, signed). A request that carries the session cookie and changes something must also
carry the CSRF header (double-submit cookie, ``starlette-csrf``); the pages' script sends it. Admin
routes (``/admin``, ``/api/admin/...``) refuse annotators with 403; an annotator reads and changes only
their own judgements.

Model text is untrusted: templates escape it (Jinja2 autoescape, no ``|safe`` on it), the script
writes it only as ``textContent``, and every answer carries a Content-Security-Policy that allows
scripts from this server's ``/static`` only (no inline script, no ``eval``), no plugins, no framing.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette_csrf import CSRFMiddleware

from rlhfkit.people import store
from rlhfkit.people.agreement import agreement, summary_lines
from rlhfkit.people.db import User, setting
from rlhfkit.people.export import TRAINING_FILE, export
from rlhfkit.people.tasks import TASKS, AnswerError, pairwise_labels
from rlhfkit.web import clean_text, limit_body

HERE = Path(__file__).parent
PUBLIC = {("GET", "/login"), ("POST", "/login")}  # and /static/*
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
FLAG_KEYS = "qwertyuio"


class JudgementIn(BaseModel):
    """An answer, in the positions the annotator saw (see :mod:`rlhfkit.people.tasks`); only the
    fields of the project's task may be set."""

    model_config = ConfigDict(extra="forbid")
    preference: StrictInt | None = None
    reason: str | None = Field(None, max_length=20_000)
    ranks: list[StrictInt] | None = Field(None, max_length=9)
    rating: StrictInt | None = None
    flags: list[str] | None = Field(None, max_length=50)
    labels: list[StrictInt] | None = Field(None, max_length=200)
    critique: str | None = Field(None, max_length=20_000)

    @field_validator("reason", "critique")
    @classmethod
    def no_nul(cls, v):
        return None if v is None else clean_text(v)


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag: StrictBool = False
    reason: str = Field("", max_length=5_000)

    @field_validator("reason")
    @classmethod
    def no_nul(cls, v):
        return clean_text(v)


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: str = "annotator"


def current_user(request: Request) -> User:
    """The user a request comes from (bearer token, or a browser session whose token is still valid);
    401 otherwise."""
    db = request.app.state.db
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        user = store.user_for_token(db, token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HTTPException(401, "unknown or revoked token (Authorization: Bearer <token>)")
        return user
    sess = request.session
    user = store.user_by_id(db, sess["uid"], sess.get("th", "")) if "uid" in sess else None
    if user is None:
        raise HTTPException(401, "log in with your token (/login), or send Authorization: Bearer <token>")
    return user


Me = Annotated[User, Depends(current_user)]


def admin_user(user: Me) -> User:
    if user.role != "admin":
        raise HTTPException(403, "this route is for admins")
    return user


Admin = Annotated[User, Depends(admin_user)]


def create_app(db: sessionmaker, secure_cookies: bool = False, max_body_mb: float = 2.0) -> FastAPI:
    app = FastAPI(title="rlhfkit annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    markdown = MarkdownIt("commonmark", {"html": False})
    secret = setting(db, "session_secret")

    # ---------------------------------------------------------------- errors
    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")

    def page(request: Request, name: str, status_code: int = 200, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if wants_html(request):
            return page(request, "error.html", exc.status_code, status=exc.status_code, message=exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(x) for x in e["loc"] if x != "body"), "message": e["msg"]}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    for exc_type, status in ((AnswerError, 422), (store.NotFound, 404), (store.Forbidden, 403),
                             (store.Conflict, 409)):
        def handler(request: Request, exc: Exception, status=status):
            if wants_html(request):
                return page(request, "error.html", status, status=status, message=str(exc))
            return JSONResponse({"detail": str(exc)}, status_code=status)

        app.add_exception_handler(exc_type, handler)

    # Added innermost first: a request meets the size limit, then the security headers (on every
    # answer, the CSRF refusal included), the session, the CSRF check, and the route.
    app.add_middleware(CSRFMiddleware, secret=secret, sensitive_cookies={"session"}, cookie_samesite="strict",
                       cookie_secure=secure_cookies)
    app.add_middleware(SessionMiddleware, secret_key=secret, same_site="strict", https_only=secure_cookies,
                       max_age=7 * 24 * 3600)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    limit_body(app, max_body_mb)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ---------------------------------------------------------------- pages
    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        return page(request, "login.html")

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form(max_length=200)]):
        user = store.user_for_token(db, token.strip())
        if user is None:
            return page(request, "login.html", 401, error="Unknown or revoked token.")
        request.session.clear()
        request.session.update({"uid": user.id, "th": user.token_hash})
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, user: Me):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, user: Me):
        return page(request, "home.html", user=user, projects=store.list_projects(db, user))

    @app.get("/p/{name}", response_class=HTMLResponse)
    def annotate_page(request: Request, name: str, user: Me):
        info = store.project_info(db, name)
        item = store.next_item(db, name, user)
        guidelines = Markup(markdown.render(info["guidelines"])) if info["guidelines"] else ""  # noqa: S704
        if item is None:
            return page(request, "done.html", user=user, project=info, guidelines=guidelines)
        opts = item["options"]
        return page(request, "annotate.html", user=user, project=info, item=item, task=TASKS[item["task"]],
                    guidelines=guidelines, scale=pairwise_labels(opts["strength"]) if item["task"] == "pairwise" else [],
                    flag_keys=FLAG_KEYS, item_json=json.dumps({"project": name, "item": item["item"],
                                                               "task": item["task"], "n": len(item["responses"]),
                                                               "options": opts}))

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, user: Admin):
        return page(request, "admin.html", user=user, projects=store.list_projects(db), users=store.list_users(db))

    @app.get("/admin/p/{name}", response_class=HTMLResponse)
    def admin_project_page(request: Request, name: str, user: Admin):
        stats = store.progress(db, name)
        return page(request, "admin_project.html", user=user, stats=stats,
                    agreement=summary_lines(agreement(db, name)))

    # ---------------------------------------------------------------- API: annotators
    @app.get("/api/health")
    def health(user: Me):
        return {"status": "ok"}

    @app.get("/api/me")
    def me(user: Me):
        return {"name": user.name, "role": user.role}

    @app.get("/api/projects")
    def projects(user: Me):
        return {"projects": store.list_projects(db, user)}

    @app.get("/api/projects/{name}")
    def project(name: str, user: Me):
        return store.project_info(db, name)

    @app.post("/api/projects/{name}/next")
    def next_item(name: str, user: Me):
        item = store.next_item(db, name, user)
        return {"item": item, "done": item is None}

    @app.post("/api/projects/{name}/items/{item_id}/judgement")
    def judge(name: str, item_id: int, body: JudgementIn, response: Response, user: Me):
        judgement, created = store.submit(db, name, user, item_id, body.model_dump(exclude_none=True))
        response.status_code = 201 if created else 200
        return {**judgement, "created": created}

    @app.post("/api/projects/{name}/items/{item_id}/skip")
    def skip(name: str, item_id: int, body: SkipIn, user: Me):
        store.skip(db, name, user, item_id, body.flag, body.reason)
        return {"item": item_id, "state": "flagged" if body.flag else "skipped"}

    @app.get("/api/judgements")
    def judgements(user: Me, project: str | None = None):
        return {"judgements": store.my_judgements(db, user, project)}

    @app.get("/api/judgements/{jid}")
    def judgement(jid: int, user: Me):
        return store.get_judgement(db, jid, user)

    @app.put("/api/judgements/{jid}")
    def change(jid: int, body: JudgementIn, user: Me):
        return store.update_judgement(db, jid, user, body.model_dump(exclude_none=True))

    # ---------------------------------------------------------------- API: admins
    @app.get("/api/admin/projects")
    def admin_projects(user: Admin):
        return {"projects": store.list_projects(db)}

    @app.get("/api/admin/projects/{name}/stats")
    def admin_stats(name: str, user: Admin):
        return {**store.progress(db, name), "agreement": agreement(db, name)}

    @app.get("/api/admin/projects/{name}/export/{what}")
    def admin_export(name: str, what: str, user: Admin, min_votes: int | None = None):
        """``what``: ``training`` (the task's training file) or ``events``; JSON lines."""
        if what not in ("training", "events"):
            raise HTTPException(404, "export what: 'training' or 'events'")
        with tempfile.TemporaryDirectory() as tmp:
            stats = export(db, name, tmp, min_votes)
            path = Path(tmp) / (TRAINING_FILE[stats["task"]] if what == "training" else "events.jsonl")
            return PlainTextResponse(path.read_text(), media_type="application/x-ndjson",
                                     headers={"X-Export-Stats": json.dumps(stats)})

    @app.get("/api/admin/users")
    def admin_users(user: Admin):
        return {"users": store.list_users(db)}

    @app.post("/api/admin/users", status_code=201)
    def admin_add_user(body: UserIn, user: Admin):
        return {"name": body.name, "role": body.role, "token": store.add_user(db, body.name, body.role)}

    return app


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, for the tests that check each one's auth."""
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or []):
            if m != "HEAD" and re.match(r"^/(?!static)", r.path):
                out.append((m, r.path))
    return out
