"""Human feedback for real: the annotation web app (``rlhfkit annotate``), its database and its export.

``db`` (tables, connection, Alembic migrations) → ``tasks`` (the judgement types) → ``store`` (every
action, one transaction each) → ``export`` and ``app`` (FastAPI) → ``commands`` (the CLI).
"""
