"""The errors a user can cause, and nothing else.

Every expected failure (bad data, a missing file or model, a bad config, an unreachable server) is a
:class:`RlhfkitError`. The command line prints its message as one line, ``rlhfkit: error: ...``, and
exits with status 2; ``--debug`` (or ``RLHFKIT_DEBUG=1``) shows the traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys


class RlhfkitError(Exception):
    """An expected error: its message says what is wrong and where (file, line, field or key)."""


class ConfigError(RlhfkitError, ValueError):
    """A bad or missing config value, flag or config file."""


class RemoteError(RlhfkitError, RuntimeError):
    """A server (remote reward, judge endpoint) that cannot be reached or answers wrongly. Names the URL."""


class StoppedError(RlhfkitError, RuntimeError):
    """A run that stopped itself (a NaN loss): the message names the last good checkpoint."""


class Waiting(Exception):
    """Not an error: a stage that needs people (human feedback) stops until their judgements are in.
    Its message says what is missing and how to go on; the command exits 0."""


@functools.cache
def warn_once(message: str) -> None:
    """Print ``rlhfkit: warning: message`` to stderr, once per process for each message."""
    print(f"rlhfkit: warning: {message}", file=sys.stderr)
