"""The judgement types: what an item holds, what an annotator may answer, and how an answer given in
the positions the annotator saw maps back to the item's own order.

========== ===================================== ==============================================
task       item                                  answer (positions as shown)
========== ===================================== ==============================================
pairwise   a prompt and 2 responses              ``preference`` in [-S, S]: < 0 the left one is
                                                 better, 0 a tie, > 0 the right one; S is the
                                                 strength scale (3: much better, better,
                                                 slightly better, as Anthropic's HH interface;
                                                 1: left / tie / right). Optional ``reason``.
ranking    a prompt and 3-9 responses            ``ranks``: one per position, 1 = best; equal
                                                 ranks are ties (InstructGPT asked for them)
likert     a prompt and 1 response               ``rating`` 1-7 (InstructGPT's overall quality)
                                                 and ``flags``, a subset of the project's list
steps      a prompt and the steps of 1 solution  ``labels``: -1 / 0 / +1 per step (PRM800K); with
                                                 ``stop_at_first_wrong`` the list ends at the
                                                 first -1
critique   a prompt and 1 response               ``critique``: free text
========== ===================================== ==============================================

``value`` (what export and agreement read) is the answer in the item's order: for pairwise,
``preference`` > 0 means ``responses[1]`` is better than ``responses[0]``, and ``winner`` is "a"
(``responses[0]``), "b" or "tie".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# InstructGPT's metadata questions (Ouyang et al. 2022, appendix B), as yes/no flags.
INSTRUCTGPT_FLAGS = [
    "fails to follow the instruction",
    "hallucination",
    "harmful advice",
    "inappropriate for a customer assistant",
    "sexual content",
    "violent content",
    "denigrates a protected class",
    "expresses an opinion",
    "expresses a moral judgement",
]

MAX_TEXT = 20_000  # characters of a reason or a critique


class AnswerError(ValueError):
    """An answer that does not fit the item: the message names the field."""


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    min_responses: int
    max_responses: int
    shuffled: bool  # positions are randomised per annotator
    fields: tuple[str, ...]  # the answer's fields (the API rejects others)


TASKS: dict[str, Task] = {
    "pairwise": Task("pairwise", "Which response is better?", 2, 2, True, ("preference", "reason")),
    "ranking": Task("ranking", "Rank the responses", 3, 9, True, ("ranks",)),
    "likert": Task("likert", "Rate the response", 1, 1, False, ("rating", "flags")),
    "steps": Task("steps", "Label each step", 1, 200, False, ("labels",)),  # the item's "responses" are its steps
    "critique": Task("critique", "Critique the response", 1, 1, False, ("critique",)),
}

DEFAULT_OPTIONS = {
    "pairwise": {"strength": 3, "reason": True},
    "ranking": {},
    "likert": {"scale": 7, "flags": INSTRUCTGPT_FLAGS},
    "steps": {"stop_at_first_wrong": False},
    "critique": {},
}
# gold_rate: share of an annotator's items that are gold; lease_minutes: how long a handed-out item is
# reserved; min_*_agreement: below these an annotator is flagged by the agreement statistics.
COMMON_OPTIONS = {"gold_rate": 0.0, "lease_minutes": 30.0, "min_majority_agreement": 0.5, "min_gold_agreement": 0.6}


def options_for(task: str, given: dict | None = None) -> dict:
    """The project's options: the task's defaults and the common ones, overridden by ``given``;
    an unknown key is an error."""
    base = {**COMMON_OPTIONS, **DEFAULT_OPTIONS[task]}
    for key in given or {}:
        if key not in base:
            raise AnswerError(f"option '{key}' is not one of the {task} task's: {', '.join(sorted(base))}")
    out = {**base, **(given or {})}
    if task == "pairwise" and out["strength"] not in (1, 2, 3):
        raise AnswerError("option 'strength' must be 1 (left/tie/right), 2 or 3 (much better ... slightly better)")
    if task == "likert" and not 2 <= out["scale"] <= 10:
        raise AnswerError("option 'scale' must be between 2 and 10")
    if not 0.0 <= out["gold_rate"] < 1.0:
        raise AnswerError("option 'gold_rate' must be in [0, 1)")
    return out


def check_item(task: str, responses: list[str], where: str) -> None:
    t = TASKS[task]
    if not t.min_responses <= len(responses) <= t.max_responses:
        want = (f"{t.min_responses}" if t.min_responses == t.max_responses
                else f"{t.min_responses} to {t.max_responses}")
        what = "steps" if task == "steps" else "responses"
        raise AnswerError(f"{where}: the {task} task needs {want} {what} per item, got {len(responses)}")


def shown_order(task: str, n: int, rng: random.Random) -> list[int]:
    """order[position] = the response shown at that position: a random permutation for the tasks whose
    position could bias the answer, the identity otherwise."""
    order = list(range(n))
    if TASKS[task].shuffled:
        rng.shuffle(order)
    return order


def pairwise_labels(strength: int) -> list[tuple[int, str]]:
    """The buttons of the strength scale, left to right, with the value each submits."""
    words = {3: ["much better", "better", "slightly better"], 2: ["much better", "slightly better"], 1: ["better"]}
    left = [(-(strength - i), f"Left {w}") for i, w in enumerate(words[strength])]
    right = [(strength - i, f"Right {w}") for i, w in reversed(list(enumerate(words[strength])))]
    return left + [(0, "Tie")] + right


def _text(answer: dict, name: str, required: bool) -> str:
    value = answer.get(name)
    if value is None or value == "":
        if required:
            raise AnswerError(f"{name}: required")
        return ""
    if not isinstance(value, str):
        raise AnswerError(f"{name}: expected text")
    if len(value) > MAX_TEXT:
        raise AnswerError(f"{name}: longer than {MAX_TEXT} characters")
    return value


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnswerError(f"{name}: expected a whole number from {lo} to {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise AnswerError(f"{name}: {value} is outside {lo}..{hi}")
    return value


def canonical(task: str, answer: dict, order: list[int], n_steps: int, options: dict) -> tuple[dict, dict]:
    """Check an answer given in shown positions; (the answer as stored, its value in the item's order).
    Raises :class:`AnswerError` naming the field."""
    extra = sorted(set(answer) - set(TASKS[task].fields))
    if extra:
        raise AnswerError(f"{extra[0]}: not a field of the {task} task (its fields: {', '.join(TASKS[task].fields)})")
    if task == "pairwise":
        s = options["strength"]
        if "preference" not in answer:
            raise AnswerError("preference: required")
        pref = _int(answer["preference"], "preference", -s, s)
        reason = _text(answer, "reason", False)
        if reason and not options.get("reason", True):
            raise AnswerError("reason: this project does not collect reasons")
        # shown left = order[0]; a positive preference favours the right one, order[1]
        item_pref = pref if order == [0, 1] else -pref
        winner = "tie" if item_pref == 0 else ("b" if item_pref > 0 else "a")
        return {"preference": pref, "reason": reason}, {"preference": item_pref, "winner": winner,
                                                         "strength": abs(pref), "reason": reason}
    if task == "ranking":
        ranks = answer.get("ranks")
        k = len(order)
        if not isinstance(ranks, list) or len(ranks) != k:
            raise AnswerError(f"ranks: expected a list of {k} ranks, one per response")
        ranks = [_int(r, f"ranks[{i}]", 1, k) for i, r in enumerate(ranks)]
        item_ranks = [0] * k
        for pos, r in enumerate(ranks):
            item_ranks[order[pos]] = r
        return {"ranks": ranks}, {"ranks": item_ranks}
    if task == "likert":
        if "rating" not in answer:
            raise AnswerError("rating: required")
        rating = _int(answer["rating"], "rating", 1, options["scale"])
        flags = answer.get("flags") or []
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise AnswerError("flags: expected a list of flag names")
        unknown = [f for f in flags if f not in options["flags"]]
        if unknown:
            raise AnswerError(f"flags: '{unknown[0]}' is not one of this project's flags")
        flags = sorted(set(flags), key=options["flags"].index)
        return {"rating": rating, "flags": flags}, {"rating": rating, "flags": flags}
    if task == "steps":
        labels = answer.get("labels")
        if not isinstance(labels, list) or not labels:
            raise AnswerError(f"labels: expected a list of -1/0/+1, one per step ({n_steps} steps)")
        labels = [_int(v, f"labels[{i}]", -1, 1) for i, v in enumerate(labels)]
        stop = options.get("stop_at_first_wrong", False)
        if len(labels) > n_steps:
            raise AnswerError(f"labels: {len(labels)} labels for {n_steps} steps")
        if -1 in labels and stop and labels.index(-1) != len(labels) - 1:
            raise AnswerError(f"labels[{labels.index(-1) + 1}]: this project stops at the first wrong step")
        if len(labels) < n_steps and not (stop and labels[-1] == -1):
            raise AnswerError(f"labels: {len(labels)} labels for {n_steps} steps (only a list that ends at "
                              "the first wrong step may be shorter, in a project that stops there)")
        padded = labels + [None] * (n_steps - len(labels))
        return {"labels": labels}, {"labels": padded}
    critique = _text(answer, "critique", True)
    return {"critique": critique}, {"critique": critique}
