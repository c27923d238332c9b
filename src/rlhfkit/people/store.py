"""What the annotation app does to its database, one function per action, each in one transaction.

Assignment (:func:`next_item`) and submission (:func:`submit`) are the parts that must hold when many
annotators act at once:

* an annotator is never given an item twice: one assignment per (item, annotator), a unique key;
* an item leaves the queue once ``overlap`` judgements are submitted: :func:`submit` locks the item's
  row, checks ``n_submitted < overlap`` and raises it in the same transaction as the insert, so the
  count can never pass ``overlap``; open assignments (leases) count too when items are handed out, so
  annotators are not sent to items others are already finishing;
* an acknowledged judgement is committed: the HTTP answer is sent after the commit (and SQLite runs
  with ``synchronous=FULL``), so a server killed after answering has the judgement on disk;
* a repeated submission (a client that retries after a lost answer) returns the stored judgement
  instead of making a second one.

On SQLite every transaction is ``BEGIN IMMEDIATE`` (one writer at a time); on PostgreSQL the item row is
locked (``FOR UPDATE``; ``SKIP LOCKED`` when handing out, so annotators do not queue on one item) and
the open leases are counted again, in a fresh statement, once the lock is held.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
import time

from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.people.db import Assignment, Item, Judgement, Project, User, transaction
from rlhfkit.people.tasks import TASKS, AnswerError, canonical, check_item, options_for, shown_order

ROLES = ("annotator", "admin")


class NotFound(LookupError):
    pass


class Forbidden(PermissionError):
    pass


class Conflict(RuntimeError):
    pass


def hash_token(token: str) -> str:
    """Tokens are 256 random bits, so one SHA-256 is enough to store them (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- users


def add_user(db: sessionmaker, name: str, role: str = "annotator") -> str:
    """Create an annotator or admin; the token, which is stored only hashed (show it once)."""
    if role not in ROLES:
        raise AnswerError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if not name.strip():
        raise AnswerError("name: required")
    token = secrets.token_urlsafe(32)
    try:
        with transaction(db) as s:
            s.add(User(name=name, role=role, token_hash=hash_token(token), created_at=time.time(), active=True))
    except IntegrityError:
        raise Conflict(f"a user named {name!r} exists already") from None
    return token


def user_for_token(db: sessionmaker, token: str) -> User | None:
    if not token:
        return None
    with db() as s:
        return s.scalar(select(User).where(User.token_hash == hash_token(token), User.active.is_(True)))


def user_by_id(db: sessionmaker, uid: int, token_hash: str) -> User | None:
    """The user of a browser session, if the token it logged in with is still the user's."""
    with db() as s:
        u = s.get(User, uid)
        return u if u is not None and u.active and secrets.compare_digest(u.token_hash, token_hash) else None


def list_users(db: sessionmaker) -> list[dict]:
    with db() as s:
        return [{"id": u.id, "name": u.name, "role": u.role, "active": u.active, "created_at": u.created_at}
                for u in s.scalars(select(User).order_by(User.id))]


def set_active(db: sessionmaker, name: str, active: bool) -> None:
    with transaction(db) as s:
        u = s.scalar(select(User).where(User.name == name))
        if u is None:
            raise NotFound(f"no user named {name!r}")
        u.active = active


# ---------------------------------------------------------------------------------------- projects


def create_project(db: sessionmaker, name: str, task: str, overlap: int, items: list[dict],
                   gold: list[dict] = (), guidelines: str = "", options: dict | None = None) -> int:
    """A project and its items. Each item is ``{"prompt": [messages], "responses": [texts], "meta": {}}``
    (for ``steps``, ``responses`` holds the steps); each gold item has a ``gold`` answer too, as a
    value in the item's order (see :mod:`rlhfkit.people.tasks`)."""
    if task not in TASKS:
        raise AnswerError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if overlap < 1:
        raise AnswerError("overlap: must be at least 1")
    opts = options_for(task, options)
    if not items:
        raise AnswerError("the project has no items")
    for i, it in enumerate([*items, *gold]):
        check_item(task, it["responses"], f"item {i}")
    try:
        with transaction(db) as s:
            p = Project(name=name, task=task, overlap=overlap, guidelines=guidelines, options=opts,
                        created_at=time.time())
            s.add(p)
            s.flush()
            for i, it in enumerate(items):
                s.add(Item(project_id=p.id, position=i, prompt=it["prompt"], responses=it["responses"],
                           is_gold=False, gold=None, n_submitted=0, meta=it.get("meta") or {}))
            for i, it in enumerate(gold):
                s.add(Item(project_id=p.id, position=len(items) + i, prompt=it["prompt"], responses=it["responses"],
                           is_gold=True, gold=it["gold"], n_submitted=0, meta=it.get("meta") or {}))
            return p.id
    except IntegrityError:
        raise Conflict(f"a project named {name!r} exists already") from None


def get_project(s: Session, name: str) -> Project:
    p = s.scalar(select(Project).where(Project.name == name))
    if p is None:
        raise NotFound(f"no project named {name!r}")
    return p


def list_projects(db: sessionmaker, user: User | None = None) -> list[dict]:
    """Every project with its progress; with ``user``, how many that annotator has done and whether
    their queue still has work."""
    with db() as s:
        out = []
        for p in s.scalars(select(Project).order_by(Project.id)):
            row = {"name": p.name, "task": p.task, "overlap": p.overlap, **counts(s, p)}
            if user is not None:
                row["mine"] = s.scalar(select(func.count()).select_from(Judgement).where(
                    Judgement.project_id == p.id, Judgement.user_id == user.id))
            out.append(row)
        return out


def counts(s: Session, p: Project) -> dict:
    items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == p.id, Item.is_gold.is_(False)))
    complete = s.scalar(select(func.count()).select_from(Item).where(
        Item.project_id == p.id, Item.is_gold.is_(False), Item.n_submitted >= p.overlap))
    judgements = s.scalar(select(func.count()).select_from(Judgement).where(Judgement.project_id == p.id))
    return {"items": items, "complete": complete, "judgements": judgements}


def project_exists(db: sessionmaker, name: str) -> bool:
    with db() as s:
        return s.scalar(select(Project.id).where(Project.name == name)) is not None


def completion(db: sessionmaker, name: str) -> dict:
    """Items, complete items and judgements of a project (what a stage waiting for people polls)."""
    with db() as s:
        return counts(s, get_project(s, name))


def project_info(db: sessionmaker, name: str) -> dict:
    with db() as s:
        p = get_project(s, name)
        return {"name": p.name, "task": p.task, "overlap": p.overlap, "guidelines": p.guidelines,
                "options": p.options}


def progress(db: sessionmaker, name: str) -> dict:
    """Counts for ``annotate stats``: items, complete items, gold, and per annotator the judgements,
    skips, flags and median seconds per judgement."""
    with db() as s:
        p = get_project(s, name)
        out = {"project": p.name, "task": p.task, "overlap": p.overlap, **counts(s, p)}
        out["gold_items"] = s.scalar(select(func.count()).select_from(Item).where(
            Item.project_id == p.id, Item.is_gold.is_(True)))
        out["judgements_by_votes"] = {str(n): c for n, c in s.execute(
            select(Item.n_submitted, func.count()).where(Item.project_id == p.id, Item.is_gold.is_(False))
            .group_by(Item.n_submitted).order_by(Item.n_submitted))}
        annotators = {}
        for u in s.scalars(select(User).order_by(User.id)):
            js = s.execute(select(Judgement.submitted_at - Judgement.shown_at, Item.is_gold).join(
                Item, Item.id == Judgement.item_id).where(Judgement.project_id == p.id, Judgement.user_id == u.id)).all()
            states = dict(s.execute(select(Assignment.state, func.count()).where(
                Assignment.project_id == p.id, Assignment.user_id == u.id).group_by(Assignment.state)).all())
            if not js and not states:
                continue
            secs = sorted(d for d, _ in js)
            annotators[u.name] = {"judgements": len(js), "gold": sum(g for _, g in js),
                                  "skipped": states.get("skipped", 0), "flagged": states.get("flagged", 0),
                                  "open": states.get("open", 0),
                                  "median_seconds": round(secs[len(secs) // 2], 3) if secs else None}
        out["annotators"] = annotators
        return out


# -------------------------------------------------------------------------------------- the queue


def _view(p: Project, item: Item, a: Assignment) -> dict:
    """What an annotator sees of an item: the responses in the positions of their assignment (never
    the gold answer, the other annotators' judgements or whether it is a gold item)."""
    shown = [item.responses[i] for i in a.order] if p.task != "steps" else list(item.responses)
    opts = {k: v for k, v in p.options.items() if k in ("strength", "reason", "scale", "flags", "stop_at_first_wrong")}
    return {"project": p.name, "task": p.task, "item": item.id, "prompt": item.prompt,
            "responses": shown, "options": opts, "expires_at": a.expires_at}


def _open_leases(s: Session, item_id: int, now: float) -> int:
    return s.scalar(select(func.count()).select_from(Assignment).where(
        Assignment.item_id == item_id, Assignment.state == "open", Assignment.expires_at > now))


def _pick(s: Session, p: Project, user: User, gold: bool, now: float) -> Item | None:
    """The next item for ``user``: one they were never given, whose submitted judgements and open
    leases leave room (gold items: any they have not seen), the fullest first so items complete."""
    tried: list[int] = []
    seen = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    while True:
        q = select(Item).where(Item.project_id == p.id, Item.is_gold.is_(gold), ~seen)
        if not gold:
            leases = (select(func.count()).select_from(Assignment)
                      .where(Assignment.item_id == Item.id, Assignment.state == "open", Assignment.expires_at > now)
                      .correlate(Item).scalar_subquery())
            q = q.where(Item.n_submitted + leases < p.overlap)
        if tried:
            q = q.where(Item.id.not_in(tried))
        order = (Item.position,) if gold else (Item.n_submitted.desc(), Item.position)
        item = s.scalar(q.order_by(*order).limit(1).with_for_update(skip_locked=True, of=Item))
        if item is None:
            return None
        # the row is locked now: count again with what has committed since the query's snapshot
        if gold or item.n_submitted + _open_leases(s, item.id, now) < p.overlap:
            return item
        tried.append(item.id)


def next_item(db: sessionmaker, name: str, user: User) -> dict | None:
    """The item an annotator should judge now: the one they already hold (a reload shows it again), or
    a new one, gold mixed in at the project's ``gold_rate``; None when their queue is empty."""
    for attempt in range(3):
        try:
            with transaction(db) as s:
                return _next_item(s, name, user)
        except IntegrityError:  # the same annotator asking twice at once (PostgreSQL): ask again
            if attempt == 2:
                raise
    return None


def _next_item(s: Session, name: str, user: User) -> dict | None:
    now = time.time()
    p = get_project(s, name)
    lease = p.options.get("lease_minutes", 30.0) * 60
    for a in s.scalars(select(Assignment).where(Assignment.project_id == p.id, Assignment.user_id == user.id,
                                                Assignment.state == "open").order_by(Assignment.id)):
        item = s.get(Item, a.item_id)
        if item.is_gold or item.n_submitted < p.overlap:
            a.expires_at = now + lease
            return _view(p, item, a)
        a.state, a.closed_at = "expired", now  # others completed it while the lease was out
    done = s.scalar(select(func.count()).select_from(Judgement).where(
        Judgement.project_id == p.id, Judgement.user_id == user.id))
    rate = p.options.get("gold_rate", 0.0)
    item = None
    if rate > 0 and math.floor((done + 1) * rate) > math.floor(done * rate):
        item = _pick(s, p, user, True, now)
    item = item or _pick(s, p, user, False, now)
    if item is None:
        return None
    a = Assignment(project_id=p.id, item_id=item.id, user_id=user.id,
                   order=shown_order(p.task, len(item.responses), random.SystemRandom()),
                   state="open", note="", created_at=now, expires_at=now + lease)
    s.add(a)
    s.flush()
    return _view(p, item, a)


def _judgement_view(j: Judgement, p: Project | None = None, user: User | None = None) -> dict:
    return {"id": j.id, "item": j.item_id, "project": p.name if p else j.project_id,
            "annotator": user.name if user else j.user_id, "answer": j.answer, "value": j.value,
            "order": j.order, "shown_at": j.shown_at, "submitted_at": j.submitted_at, "updated_at": j.updated_at}


def submit(db: sessionmaker, name: str, user: User, item_id: int, answer: dict) -> tuple[dict, bool]:
    """Record a judgement; (the stored judgement, whether this call created it). Raises NotFound when
    the annotator was never given the item, Conflict when it is complete already or they judged it
    differently before, AnswerError for an answer that does not fit."""
    try:
        with transaction(db) as s:
            return _submit(s, name, user, item_id, answer)
    except IntegrityError:  # the same judgement arriving twice at once (PostgreSQL): the first one won
        with db() as s:
            j = s.scalar(select(Judgement).where(Judgement.item_id == item_id, Judgement.user_id == user.id))
            if j is None:
                raise
            return _judgement_view(j, get_project(s, name), user), False


def _submit(s: Session, name: str, user: User, item_id: int, answer: dict) -> tuple[dict, bool]:
    now = time.time()
    p = get_project(s, name)
    item = s.scalar(select(Item).where(Item.id == item_id, Item.project_id == p.id).with_for_update())
    a = None if item is None else s.scalar(select(Assignment).where(
        Assignment.item_id == item_id, Assignment.user_id == user.id))
    if a is None:
        raise NotFound(f"item {item_id} of project {p.name!r} was not given to you (ask for /next first)")
    stored, value = canonical(p.task, answer, a.order, len(item.responses), p.options)
    old = s.scalar(select(Judgement).where(Judgement.item_id == item_id, Judgement.user_id == user.id))
    if old is not None:
        if old.answer == stored:
            return _judgement_view(old, p, user), False
        raise Conflict(f"you judged item {item_id} already (judgement {old.id}); "
                       f"PUT /api/judgements/{old.id} changes it")
    if not item.is_gold and item.n_submitted >= p.overlap:
        a.state, a.closed_at = "expired", now
        raise Conflict(f"item {item_id} is complete: {p.overlap} other annotators judged it while your lease "
                       "had expired")
    j = Judgement(project_id=p.id, item_id=item_id, user_id=user.id, order=a.order, answer=stored, value=value,
                  shown_at=a.created_at, submitted_at=now, updated_at=None)
    s.add(j)
    item.n_submitted += 1
    a.state, a.closed_at = "submitted", now
    s.flush()
    return _judgement_view(j, p, user), True


def skip(db: sessionmaker, name: str, user: User, item_id: int, flag: bool = False, reason: str = "") -> None:
    """Skip an item (it leaves this annotator's queue), or flag it as broken, with a reason."""
    with transaction(db) as s:
        p = get_project(s, name)
        a = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user.id,
                                              Assignment.project_id == p.id))
        if a is None:
            raise NotFound(f"item {item_id} of project {p.name!r} was not given to you")
        if a.state == "submitted":
            raise Conflict(f"you judged item {item_id} already")
        a.state, a.note, a.closed_at = ("flagged" if flag else "skipped"), reason, time.time()


def _own(s: Session, jid: int, user: User) -> Judgement:
    j = s.get(Judgement, jid)
    if j is None:
        raise NotFound(f"no judgement {jid}")
    if j.user_id != user.id and user.role != "admin":
        raise Forbidden(f"judgement {jid} is another annotator's")
    return j


def get_judgement(db: sessionmaker, jid: int, user: User) -> dict:
    with db() as s:
        j = _own(s, jid, user)
        return _judgement_view(j, s.get(Project, j.project_id), s.get(User, j.user_id))


def update_judgement(db: sessionmaker, jid: int, user: User, answer: dict) -> dict:
    """An annotator changes their own judgement (the count of the item is unchanged)."""
    with transaction(db) as s:
        j = _own(s, jid, user)
        if j.user_id != user.id:
            raise Forbidden(f"judgement {jid} is another annotator's: only they can change it")
        p, item = s.get(Project, j.project_id), s.get(Item, j.item_id)
        j.answer, j.value = canonical(p.task, answer, j.order, len(item.responses), p.options)
        j.updated_at = time.time()
        return _judgement_view(j, p, user)


def my_judgements(db: sessionmaker, user: User, name: str | None = None) -> list[dict]:
    with db() as s:
        q = select(Judgement).where(Judgement.user_id == user.id)
        p = None
        if name:
            p = get_project(s, name)
            q = q.where(Judgement.project_id == p.id)
        return [_judgement_view(j, p or s.get(Project, j.project_id), user) for j in s.scalars(q.order_by(Judgement.id))]
