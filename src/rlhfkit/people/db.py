"""The annotation database: its tables (SQLAlchemy 2), how to connect to SQLite or PostgreSQL, and the
Alembic migrations that build and upgrade it.

One schema serves both databases. JSON values (prompts, responses, answers) are stored as JSON *text*:
PostgreSQL's text and JSONB types refuse a NUL byte, and model text may hold one, so it travels escaped
(``\\u0000``) and comes back as it was. Times are seconds since the epoch (UTC).

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before the client hears of it)
and a busy timeout. A write (:func:`transaction`) opens with ``BEGIN IMMEDIATE``, so concurrent writers
queue instead of failing on a stale read, and within one server process the writers queue on a lock
first (fair and prompt, where SQLite's busy handler polls with sleeps); reads run beside them. On
PostgreSQL the same code takes row locks (``SELECT ... FOR UPDATE [SKIP LOCKED]``) where it reads a
row it is about to change.
"""

from __future__ import annotations

import json
import secrets
import threading
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from rlhfkit.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


class JSONText(TypeDecorator):
    """A JSON value stored as ASCII text (NUL and every non-ASCII character escaped)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else json.dumps(value, ensure_ascii=True)

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    pass


class Setting(Base):
    """Server-wide values kept with the data (the session-signing secret), so a restart keeps sessions."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "annotator" | "admin"
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token, hex
    created_at: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(32))  # see tasks.TASKS
    overlap: Mapped[int] = mapped_column(Integer)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    options: Mapped[dict] = mapped_column(JSONText, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class Item(Base):
    """One thing to judge: a prompt with its responses (a pair, 3-9 for ranking, one for a rating, a
    critique or step labels). Gold items carry their known answer and are shown to every annotator once."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[list] = mapped_column(JSONText)  # chat messages
    responses: Mapped[list] = mapped_column(JSONText)  # response texts (step labels: the steps of one)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold: Mapped[dict | None] = mapped_column(JSONText, nullable=True)  # the known answer, canonical order
    n_submitted: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict] = mapped_column(JSONText, default=dict)
    __table_args__ = (Index("ix_items_queue", "project_id", "is_gold", "n_submitted"),)


class Assignment(Base):
    """An item handed to an annotator: the order its responses were shown in, and what became of it
    (open until submitted, skipped, flagged or lost to an expired lease). One per (item, annotator)."""

    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    order: Mapped[list] = mapped_column(JSONText)  # order[position] = index of the response shown there
    state: Mapped[str] = mapped_column(String(16), default="open")  # open|submitted|skipped|flagged|expired
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),
                      Index("ix_assignments_user", "project_id", "user_id", "state"),
                      Index("ix_assignments_item", "item_id", "state"))


class Judgement(Base):
    """A submitted judgement. ``answer`` is what the annotator entered, in the positions they saw;
    ``value`` is the same in the item's own order (``order`` maps one to the other)."""

    __tablename__ = "judgements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    order: Mapped[list] = mapped_column(JSONText)
    answer: Mapped[dict] = mapped_column(JSONText)
    value: Mapped[dict] = mapped_column(JSONText)
    shown_at: Mapped[float] = mapped_column(Float)
    submitted_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_judgement_item_user"),
                      Index("ix_judgements_project", "project_id", "user_id"))


# --------------------------------------------------------------------------------------------- connect


def database_url(db: str, folder: str | Path) -> str:
    """``--db``: empty is a SQLite file ``annotate.db`` in the folder; ``postgresql://...`` goes through
    psycopg 3; any other SQLAlchemy URL is used as it is."""
    if not db:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(folder).resolve() / 'annotate.db'}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def connect(url: str) -> Engine:
    """An engine for ``url`` with the settings above (no schema work: see :func:`migrate`)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=20, max_overflow=40)

        @event.listens_for(engine, "connect")
        def sqlite_settings(dbapi_conn, record):
            dbapi_conn.isolation_level = None  # the driver opens no transactions; "begin" below does
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=60000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if getattr(_writing, "on", False) else "BEGIN")

        _WRITE_LOCKS[engine] = threading.Lock()
        return engine
    try:
        return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise ConfigError(f"the database driver for {url.split(':', 1)[0]} is missing ({e.name}): "
                          "pip install 'rlhfkit[annotate]'") from None


_WRITE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # SQLite engines: one writer at a time
_writing = threading.local()


@contextmanager
def transaction(factory: sessionmaker):
    """A session in a write transaction, committed at the end of the block (rolled back on an error)."""
    lock = _WRITE_LOCKS.get(factory.kw["bind"])
    with lock if lock is not None else nullcontext():
        _writing.on = True
        try:
            with factory.begin() as s:
                yield s
        finally:
            _writing.on = False


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (creates it on an empty database)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    _writing.on = True
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        _writing.on = False


def open_db(url: str) -> sessionmaker:
    """Connect, migrate, make sure the session secret exists; a session factory."""
    engine = connect(url)
    try:
        migrate(engine)
    except Exception as e:  # an unreachable server or a bad URL: say which
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot open the annotation database {engine.url.render_as_string()}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    factory = sessionmaker(engine, expire_on_commit=False)
    with transaction(factory) as s:
        if s.get(Setting, "session_secret") is None:
            s.add(Setting(key="session_secret", value=secrets.token_urlsafe(48)))
    return factory


def setting(factory: sessionmaker, key: str) -> str:
    with factory() as s:
        return s.scalar(select(Setting.value).where(Setting.key == key))
