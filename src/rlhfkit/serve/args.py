"""The flags every server shares (importable without the serve extra, so `--help` works anywhere)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from rlhfkit.config import Precision
from rlhfkit.errors import ConfigError


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    token: str = ""
    """Bearer token the routes require ('' : none, unless $RLHFKIT_SERVE_TOKEN is set)."""
    max_body_mb: float = 64.0
    """Largest request body in MB (a larger one gets 413 before it is read)."""
    mixed_precision: Precision = "no"
    """'bf16' or 'fp16': run the model under that autocast (about 3x faster on a CPU with AMX; results differ in the
    third digit); 'auto' picks by the hardware as the training stages do; 'no' is fp32."""

    def resolve_server(self, what: str) -> None:
        """The serve extra is installed, and the token is the flag's or $RLHFKIT_SERVE_TOKEN."""
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            raise ConfigError(f"{what} needs the serve extra: pip install 'rlhfkit[serve]'")
        self.token = self.token or os.environ.get("RLHFKIT_SERVE_TOKEN", "")
