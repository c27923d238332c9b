"""Alembic environment: migrations run on the connection :func:`rlhfkit.people.db.migrate` passes in
(``config.attributes["connection"]``), online only."""

from alembic import context

from rlhfkit.people.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
