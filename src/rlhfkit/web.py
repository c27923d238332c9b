"""What every HTTP server of rlhfkit shares (the model servers and the annotation app): the bearer-token
check, the body-size limit, one 422 for a bad value and the text check every request body goes through."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse


def bearer(token: str):
    """A FastAPI dependency: 401 unless the request carries ``Authorization: Bearer <token>`` (no check
    when ``token`` is empty). Compared in constant time."""

    def check(request: Request) -> None:
        if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                             f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    return check


def reject_bad_values(app: FastAPI) -> None:
    """A ValueError raised while reading a request (an inconsistent body) is a 422 with its message."""

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})


def limit_body(app: FastAPI, max_mb: float) -> None:
    """Refuse (413) a request whose declared body is larger than ``max_mb`` before reading it."""
    limit = int(max_mb * 1e6)

    @app.middleware("http")
    async def body_size(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return JSONResponse(status_code=413, content={"detail": f"request body over {max_mb:g} MB"})
        return await call_next(request)


def clean_text(text: str) -> str:
    """Model and user text goes through as it is, but never with a NUL byte (no tokenizer or database
    downstream expects one)."""
    if "\x00" in text:
        raise ValueError("a text holds a NUL byte")
    return text
