"""``rlhfkit annotate serve``: the annotation web app and its JSON API, over a database of projects that
:mod:`rlhfkit.people` creates, fills and exports."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from rlhfkit.errors import ConfigError
from rlhfkit.people.projects import AnnotateArgs

try:  # the annotate extra: the web app
    import uvicorn

    from rlhfkit.annotate.app import create_app
except ImportError:  # pragma: no cover - exercised only without the extra
    create_app = None


@dataclass
class AnnotateServeConfig(AnnotateArgs):
    """Serve the annotation web app and its JSON API."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; put it behind HTTPS and set --secure-cookies)."""
    port: int = 8200
    """Port to listen on."""
    secure_cookies: bool = False
    """Mark the session and CSRF cookies Secure (only sent over HTTPS)."""
    max_body_mb: float = 2.0
    """Largest request body in MB."""

    def resolve(self) -> AnnotateServeConfig:
        missing = [m for m in ("fastapi", "uvicorn", "jinja2", "starlette_csrf", "itsdangerous", "multipart",
                               "markdown_it") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"annotate serve needs the annotate extra ({', '.join(missing)} missing): "
                              "pip install 'rlhfkit[annotate]'")
        return self


def run_serve(cfg: AnnotateServeConfig) -> None:
    cfg.resolve()
    db = cfg.open()
    app = create_app(db, cfg.secure_cookies, cfg.max_body_mb)
    print(f"rlhfkit annotate: http://{cfg.host}:{cfg.port}/login (database {db.kw['bind'].url.render_as_string()})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
