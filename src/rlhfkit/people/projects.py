"""``rlhfkit annotate {create,users,export,stats}``: annotation projects, their people and their exports
(the web app that serves them is :mod:`rlhfkit.annotate`).

Without the ``annotate`` extra this module still imports (so ``--help`` works); a command then says
which package is missing and how to install it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from rlhfkit.config import DataArgs, announce
from rlhfkit.data.formats import load_records
from rlhfkit.data.records import Demonstration, Preference, Ranking, Rating, StepSolution
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.feedback.label import Unscored
from rlhfkit.people.tasks import AnswerError
from rlhfkit.rollout.engine import load_engine
from rlhfkit.rollout.phase import SamplingArgs, prompts_from, rollout_phase

try:  # the annotate extra: the database
    from rlhfkit.people import store
    from rlhfkit.people.db import database_url, open_db
    from rlhfkit.people.export import export
except ImportError:  # pragma: no cover - exercised only without the extra
    store = None
try:  # the annotate extra: the statistics
    from rlhfkit.people.agreement import agreement, summary_lines
except ImportError:  # pragma: no cover
    agreement = None

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class AnnotateArgs:
    dir: str = "annotations"
    """The annotation folder: the SQLite database (annotate.db) lives here unless --db is given."""
    db: str = ""
    """Database URL: '' is SQLite in --dir (WAL mode); 'postgresql://user:password@host:5432/name' uses
    PostgreSQL through psycopg 3. Same schema and migrations on both."""

    def open(self):
        need = ["sqlalchemy", "alembic"] + (["psycopg"] if self.db.startswith("postgres") else [])
        missing = [m for m in need if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"annotate needs the annotate extra ({', '.join(missing)} missing): "
                              "pip install 'rlhfkit[annotate]'")
        return open_db(database_url(self.db, self.dir))


def wrap(fn, *args, **kwargs):
    """Run a store action, turning its errors into rlhfkit errors (one line, exit status 2)."""
    try:
        return fn(*args, **kwargs)
    except (AnswerError, store.NotFound, store.Forbidden, store.Conflict) as e:
        raise RlhfkitError(str(e)) from None


# ------------------------------------------------------------------------------------------ create


@dataclass
class CreateConfig(AnnotateArgs, DataArgs, SamplingArgs):
    """Create an annotation project from a file of prompts with responses (any format rlhfkit reads),
    or from prompts and a policy (--k responses sampled per prompt)."""

    project: str = ""
    """Project name (letters, digits, '.', '_', '-')."""
    task: Literal["pairwise", "ranking", "likert", "steps", "critique"] = "pairwise"
    """Judgement type: pairwise A/B, K-way ranking (3-9, ties allowed), Likert 1-7 with flags, step labels
    (-1/0/+1), or a free-text critique."""
    overlap: int = 3
    """Different annotators who judge each item; an item leaves the queue once it has this many."""
    guidelines: str = ""
    """A Markdown file shown above every item."""
    gold: str = ""
    """Gold items with known answers, in the task's record format: preferences (chosen is the answer),
    rankings (best first), ratings or step labels. Every annotator sees each once."""
    gold_rate: float = 0.1
    """Share of an annotator's items that are gold (when --gold is given)."""
    strength: int = 3
    """pairwise: the strength scale, 3 (much better / better / slightly better / tie), 2, or 1 (A / tie / B)."""
    reason: bool = True
    """pairwise: offer a free-text reason."""
    scale: int = 7
    """likert: the top of the rating scale."""
    flags: str = ""
    """likert: comma-separated yes/no flags ('' : InstructGPT's list)."""
    stop_at_first_wrong: bool = False
    """steps: labelling ends at the first wrong step (PRM800K's phase 2)."""
    lease_minutes: float = 30.0
    """How long an item handed out stays reserved for its annotator."""
    k: int = 0
    """Sample this many responses per prompt of --train from --model (0: --train holds the responses)."""
    model: str = "smollm2-135m-instruct"
    """The policy to sample from with --k."""
    batch_size: int = 8
    """Prompts per sampling batch (with --k)."""
    seed: int = 0
    """Sampling seed (with --k)."""

    def resolve(self) -> CreateConfig:
        if not self.project or not set(self.project) <= NAME_CHARS:
            raise ConfigError("annotate create: --project NAME is required (letters, digits, '.', '_', '-')")
        if not self.train:
            raise ConfigError("annotate create: --train FILE is required (prompts with responses, or prompts with --k)")
        if self.k == 1 and self.task in ("pairwise", "ranking"):
            raise ConfigError(f"annotate create: the {self.task} task needs --k of at least 2")
        if self.gold and self.task == "critique":
            raise ConfigError("annotate create: critiques have no gold answer; drop --gold")
        return self

    def options(self) -> dict:
        opts = {"gold_rate": self.gold_rate if self.gold else 0.0, "lease_minutes": self.lease_minutes}
        if self.task == "pairwise":
            opts.update(strength=self.strength, reason=self.reason)
        elif self.task == "likert":
            opts["scale"] = self.scale
            if self.flags:
                opts["flags"] = [f.strip() for f in self.flags.split(",") if f.strip()]
        elif self.task == "steps":
            opts["stop_at_first_wrong"] = self.stop_at_first_wrong
        return opts


def responses_by_prompt(records) -> list[tuple[list, list[str]]]:
    """(prompt, responses) in file order, the responses of records that share a prompt gathered (a
    preference gives its two, a ranking its list, a demonstration or rating its one)."""
    out: dict[str, tuple[list, list[str]]] = {}
    for r in records:
        if isinstance(r, Preference):
            texts = [r.chosen, r.rejected]
        elif isinstance(r, Ranking):
            texts = list(r.responses)
        elif isinstance(r, (Demonstration, Rating)):
            texts = [r.response]
        elif isinstance(r, StepSolution):
            texts = ["\n".join(r.steps)]
        else:
            texts = []
        texts = [t if isinstance(t, str) else t[-1]["content"] for t in texts]
        key = json.dumps(r.prompt, sort_keys=True)
        prompt, have = out.setdefault(key, (r.prompt, []))
        have.extend(t for t in texts if t not in have)
    return list(out.values())


def items_for(task: str, groups: list[tuple[list, list[str]]], records=None) -> tuple[list[dict], dict]:
    """Items of a task from prompts and their responses; (items, what was left out and why)."""
    items, left = [], {}
    if task == "steps" and records is not None and all(isinstance(r, StepSolution) for r in records):
        return [{"prompt": r.prompt, "responses": list(r.steps), "meta": {"source": r.source}} for r in records], left
    for prompt, responses in groups:
        if task == "pairwise":
            if len(responses) < 2:
                left["prompts_with_one_response"] = left.get("prompts_with_one_response", 0) + 1
            items += [{"prompt": prompt, "responses": [a, b]} for a, b in itertools.combinations(responses, 2)]
        elif task == "ranking":
            if len(responses) < 3:
                left["prompts_with_under_3_responses"] = left.get("prompts_with_under_3_responses", 0) + 1
                continue
            if len(responses) > 9:
                left["responses_past_the_9th"] = left.get("responses_past_the_9th", 0) + len(responses) - 9
            items.append({"prompt": prompt, "responses": responses[:9]})
        elif task == "steps":
            for r in responses:
                items.append({"prompt": prompt, "responses": [s for s in r.split("\n") if s.strip()] or [r]})
        else:
            items += [{"prompt": prompt, "responses": [r]} for r in responses]
    return items, left


def gold_items(task: str, path: str, fields: str) -> list[dict]:
    """Gold items and their answers (in the item's order) from a labelled file."""
    kind = {"pairwise": "preference", "ranking": "ranking", "likert": "rating", "steps": "steps"}[task]
    out = []
    for r in load_records(path, kind=kind, fields=fields).records:
        if task == "pairwise":
            out.append({"prompt": r.prompt, "responses": [r.chosen, r.rejected], "gold": {"winner": "a"}})
        elif task == "ranking":
            out.append({"prompt": r.prompt, "responses": list(r.responses),
                        "gold": {"ranks": list(range(1, len(r.responses) + 1))}})
        elif task == "likert":
            out.append({"prompt": r.prompt, "responses": [r.response], "gold": {"rating": r.rating}})
        else:
            if any(v is None for v in r.labels):
                raise ConfigError(f"{r.source}: a gold solution needs a label for every step")
            out.append({"prompt": r.prompt, "responses": list(r.steps), "gold": {"labels": r.labels}})
    return out


def sample_groups(cfg: CreateConfig) -> list[tuple[list, list[str]]]:
    """Prompts of --train and --k responses each from --model, through the rollout engine."""
    engine, tokenizer = load_engine(cfg.rollout, cfg.model, seed=cfg.seed)
    prompts = prompts_from(cfg, tokenizer)
    groups = []
    for start in range(0, len(prompts.records), cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, len(prompts.records))))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        batch = rollout_phase(engine, tokenizer, Unscored(), prompts, idx, cfg.k, cfg, g)
        for j, i in enumerate(idx):
            groups.append((prompts.records[i].prompt, batch.texts[j * cfg.k:(j + 1) * cfg.k]))
    return groups


def run_create(cfg: CreateConfig) -> dict:
    cfg.resolve()
    announce(cfg, "annotate create", cfg.dir)
    db = cfg.open()
    records = None
    if cfg.k:
        groups = sample_groups(cfg)
    else:
        records = load_records(cfg.train, fields=cfg.fields, on_bad_record=cfg.on_bad_record).records
        records = records[: cfg.limit] if cfg.limit else records
        groups = responses_by_prompt(records)
    items, left = items_for(cfg.task, groups, records)
    gold = gold_items(cfg.task, cfg.gold, cfg.fields) if cfg.gold else []
    guidelines = Path(cfg.guidelines).read_text() if cfg.guidelines else ""
    wrap(store.create_project, db, cfg.project, cfg.task, cfg.overlap, items, gold, guidelines, cfg.options())
    summary = {"project": cfg.project, "task": cfg.task, "items": len(items), "gold": len(gold),
               "overlap": cfg.overlap, "left_out": left}
    print(json.dumps(summary))
    print(f"serve it with: rlhfkit annotate serve --dir {cfg.dir}" + (f" --db {cfg.db}" if cfg.db else ""),
          file=sys.stderr)
    return summary


# ------------------------------------------------------------------------------------------- users


@dataclass
class UsersConfig(AnnotateArgs):
    """Add, list, disable or enable annotators and admins. 'add' prints the new user's token once: it
    is stored only hashed."""

    action: Annotated[Literal["add", "list", "disable", "enable"], tyro.conf.Positional] = "list"
    """What to do."""
    name: Annotated[str, tyro.conf.Positional] = ""
    """The user (for add, disable, enable)."""
    role: Literal["annotator", "admin"] = "annotator"
    """The new user's role (add)."""

    def resolve(self) -> UsersConfig:
        if self.action != "list" and not self.name:
            raise ConfigError(f"annotate users {self.action}: give the user's name")
        return self


def run_users(cfg: UsersConfig):
    cfg.resolve()
    db = cfg.open()
    if cfg.action == "add":
        token = wrap(store.add_user, db, cfg.name, cfg.role)
        print(json.dumps({"name": cfg.name, "role": cfg.role, "token": token}))
        print("the token is shown only now: give it to the user, who logs in with it", file=sys.stderr)
        return token
    if cfg.action == "list":
        users = store.list_users(db)
        print(json.dumps(users, indent=1))
        return users
    wrap(store.set_active, db, cfg.name, cfg.action == "enable")
    print(f"{cfg.name}: {'enabled' if cfg.action == 'enable' else 'disabled'}", file=sys.stderr)


# ------------------------------------------------------------------------------------ export, stats


@dataclass
class AnnotateExportConfig(AnnotateArgs):
    """Export a project's judgements: the task's training file (preferences, rankings, ratings, step
    labels, critiques) and every per-annotator event (events.jsonl)."""

    project: str = ""
    """The project."""
    output: str = ""
    """Folder to write (default: <dir>/export/<project>)."""
    min_votes: int = 0
    """Items with fewer judgements are left out (0: the project's overlap)."""
    drop_below_gold: bool = False
    """Leave out every judgement of the annotators whose agreement with the gold items is below the
    project's min_gold_agreement (the count removed is reported)."""

    def resolve(self) -> AnnotateExportConfig:
        if not self.project:
            raise ConfigError("annotate export: --project NAME is required")
        return self


def run_export(cfg: AnnotateExportConfig) -> dict:
    cfg.resolve()
    out = cfg.output or str(Path(cfg.dir) / "export" / cfg.project)
    db = cfg.open()
    drop = set()
    if cfg.drop_below_gold:
        if agreement is None:
            raise ConfigError("--drop-below-gold needs the annotate extra's statistics: pip install 'rlhfkit[annotate]'")
        info = wrap(agreement, db, cfg.project)
        drop = {c for c, g in info["agreement_with_gold"].items()
                if g["score"] is not None and g["score"] < info["thresholds"]["min_gold_agreement"]}
    stats = wrap(export, db, cfg.project, out, cfg.min_votes or None, drop)
    print(json.dumps(stats))
    return stats


@dataclass
class StatsConfig(AnnotateArgs):
    """Progress and agreement of a project: items complete, judgements per annotator, skips, flags, time
    per judgement; percent agreement, Cohen's and Fleiss' κ, Krippendorff's α, Kendall's τ, each
    annotator against the majority and gold, position and length bias."""

    project: str = ""
    """The project."""
    json: bool = False
    """Print JSON instead of a table."""

    def resolve(self) -> StatsConfig:
        if not self.project:
            raise ConfigError("annotate stats: --project NAME is required")
        return self


def run_stats(cfg: StatsConfig) -> dict:
    cfg.resolve()
    if agreement is None:
        raise ConfigError("annotate stats needs the annotate extra (scipy, scikit-learn, statsmodels, krippendorff): "
                          "pip install 'rlhfkit[annotate]'")
    db = cfg.open()
    stats = {**wrap(store.progress, db, cfg.project), "agreement": wrap(agreement, db, cfg.project)}
    if cfg.json:
        print(json.dumps(stats, indent=1))
        return stats
    print(f"{stats['project']} ({stats['task']}, overlap {stats['overlap']}): {stats['complete']}/{stats['items']} "
          f"items complete, {stats['judgements']} judgements, {stats['gold_items']} gold items")
    print(f"{'annotator':<20} {'judged':>7} {'gold':>5} {'skipped':>8} {'flagged':>8} {'open':>5} {'median s':>9}")
    for name, a in stats["annotators"].items():
        med = "-" if a["median_seconds"] is None else f"{a['median_seconds']:.1f}"
        print(f"{name:<20} {a['judgements']:>7} {a['gold']:>5} {a['skipped']:>8} {a['flagged']:>8} {a['open']:>5} "
              f"{med:>9}")
    for line in summary_lines(stats["agreement"]):
        print(line)
    return stats

