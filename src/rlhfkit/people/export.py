"""Export: the judgements of a project in the formats ``rlhfkit rm train`` and ``rlhfkit dpo`` read as
they are, and every per-annotator event.

=========== ====================== ===============================================================
task        file                   one row per item with at least ``min_votes`` judgements
=========== ====================== ===============================================================
pairwise    ``preferences.jsonl``  prompt / chosen / rejected by majority of the votes (ties: a
                                   shared top count or a "tie" majority, dropped and counted);
                                   ``margin``: the mean strength (1..S) the majority gave, when the
                                   project has a strength scale
ranking     ``rankings.jsonl``     prompt / responses best first, by mean rank over annotators
                                   (Borda); a consensus with equal mean ranks is dropped, counted
likert      ``ratings.jsonl``      prompt / response / rating (the mean), every rating and the share
                                   of annotators who set each flag
steps       ``steps.jsonl``        prompt / steps / labels: each step's majority label (null where
                                   the votes tie or none were given)
critique    ``critiques.jsonl``    one row per critique: prompt / response / critique / annotator
all         ``events.jsonl``       every judgement, skip and flag: who, when, the order shown,
                                   seconds taken, the answer as given and in the item's order
=========== ====================== ===============================================================

Gold items stay out of the training files (they are in ``events.jsonl``, marked ``gold``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from rlhfkit.data.formats import TIE, majority
from rlhfkit.people.db import Assignment, Item, Judgement, User
from rlhfkit.people.store import get_project

TRAINING_FILE = {"pairwise": "preferences.jsonl", "ranking": "rankings.jsonl", "likert": "ratings.jsonl",
                 "steps": "steps.jsonl", "critique": "critiques.jsonl"}


def consensus_pair(prompt: list, responses: list[str], values: list[dict], strength_scale: int) -> dict | None:
    """A preference row from the votes on one pair, or None for a tie."""
    winner, share = majority([v["winner"] for v in values])
    if winner == TIE:
        return None
    a, b = responses
    row = {"prompt": prompt, "chosen": a if winner == "a" else b, "rejected": b if winner == "a" else a,
           "votes": len(values), "agreement": round(share, 6)}
    if strength_scale > 1:
        strengths = [v["strength"] for v in values if v["winner"] == winner]
        row["margin"] = round(sum(strengths) / len(strengths), 6)
    return row


def consensus_ranking(prompt: list, responses: list[str], values: list[dict]) -> dict | None:
    """Responses ordered by mean rank (Borda), or None when two share a mean rank."""
    k = len(responses)
    mean = [sum(v["ranks"][i] for v in values) / len(values) for i in range(k)]
    if len(set(mean)) < k:
        return None
    order = sorted(range(k), key=mean.__getitem__)
    return {"prompt": prompt, "responses": [responses[i] for i in order],
            "mean_ranks": [round(mean[i], 6) for i in order], "votes": len(values)}


def consensus_rating(prompt: list, response: str, values: list[dict], flags: list[str]) -> dict:
    ratings = [v["rating"] for v in values]
    share = {f: round(sum(f in v["flags"] for v in values) / len(values), 6) for f in flags}
    return {"prompt": prompt, "response": response, "rating": round(sum(ratings) / len(ratings), 6),
            "ratings": ratings, "flags": {f: s for f, s in share.items() if s > 0}, "votes": len(values)}


def consensus_steps(prompt: list, steps: list[str], values: list[dict], stop_at_first_wrong: bool) -> dict:
    labels = []
    for i in range(len(steps)):
        votes = [v["labels"][i] for v in values if v["labels"][i] is not None]
        if not votes:
            labels.append(None)
            continue
        (top, n), *rest = Counter(votes).most_common()
        labels.append(None if rest and rest[0][1] == n else top)
    if stop_at_first_wrong and -1 in labels:
        cut = labels.index(-1) + 1
        labels = labels[:cut] + [None] * (len(labels) - cut)
    return {"prompt": prompt, "steps": steps, "labels": labels, "votes": len(values)}


def export(db: sessionmaker, name: str, out: str | Path, min_votes: int | None = None,
           drop: set[str] = frozenset()) -> dict:
    """Write the project's training file and ``events.jsonl`` into ``out``; the counts. The judgements
    of the annotators in ``drop`` are left out of both (and counted)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with db() as s:
        p = get_project(s, name)
        need = p.overlap if min_votes is None else min_votes
        users = {u.id: u.name for u in s.scalars(select(User))}
        items = {i.id: i for i in s.scalars(select(Item).where(Item.project_id == p.id).order_by(Item.position))}
        by_item: dict[int, list[Judgement]] = defaultdict(list)
        judgements = list(s.scalars(select(Judgement).where(Judgement.project_id == p.id).order_by(Judgement.id)))
        kept = [j for j in judgements if users[j.user_id] not in drop]
        dropped, judgements = len(judgements) - len(kept), kept
        for j in judgements:
            by_item[j.item_id].append(j)
        closed = list(s.scalars(select(Assignment).where(Assignment.project_id == p.id,
                                                          Assignment.state.in_(("skipped", "flagged")))
                                .order_by(Assignment.id)))
    stats = Counter()
    path = out / TRAINING_FILE[p.task]
    with open(path, "w") as f:
        for item in items.values():
            js = by_item.get(item.id, [])
            if item.is_gold:
                stats["gold_items_left_out"] += 1
                continue
            if len(js) < need:
                stats["items_with_too_few_votes"] += 1
                continue
            values = [j.value for j in js]
            if p.task == "critique":
                for j in js:
                    f.write(json.dumps({"prompt": item.prompt, "response": item.responses[0],
                                        "critique": j.value["critique"], "annotator": users[j.user_id],
                                        "item": item.id}) + "\n")
                    stats["rows"] += 1
                continue
            if p.task == "pairwise":
                row = consensus_pair(item.prompt, item.responses, values, p.options.get("strength", 1))
            elif p.task == "ranking":
                row = consensus_ranking(item.prompt, item.responses, values)
            elif p.task == "likert":
                row = consensus_rating(item.prompt, item.responses[0], values, p.options.get("flags", []))
            else:
                row = consensus_steps(item.prompt, item.responses, values, p.options.get("stop_at_first_wrong", False))
            if row is None:
                stats["ties_dropped"] += 1
                continue
            f.write(json.dumps({**row, "item": item.id}) + "\n")
            stats["rows"] += 1
    with open(out / "events.jsonl", "w") as f:
        for j in judgements:
            f.write(json.dumps({"event": "judgement", "id": j.id, "item": j.item_id, "annotator": users[j.user_id],
                                "gold": items[j.item_id].is_gold, "shown_at": j.shown_at, "at": j.submitted_at,
                                "seconds": round(j.submitted_at - j.shown_at, 3), "updated_at": j.updated_at,
                                "order": j.order, "answer": j.answer, "value": j.value}) + "\n")
        for a in closed:
            f.write(json.dumps({"event": "flag" if a.state == "flagged" else "skip", "item": a.item_id,
                                "annotator": users[a.user_id], "gold": items[a.item_id].is_gold,
                                "shown_at": a.created_at, "at": a.closed_at, "order": a.order,
                                "reason": a.note}) + "\n")
    stats.update(events=len(judgements) + len(closed), judgements=len(judgements))
    out = {"project": p.name, "task": p.task, "file": str(path), "min_votes": need, **stats}
    if drop:
        out.update(annotators_dropped=sorted(drop), judgements_dropped=dropped)
    return out
