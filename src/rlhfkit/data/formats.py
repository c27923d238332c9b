"""Format detection and conversion of raw rows into typed records, with validation.

Detected automatically from the first valid row (after field mapping):

==========================  =======================================  ==============
row fields                  format                                   record
==========================  =======================================  ==============
chosen, rejected (strings   ``hh-rlhf``: ``\\n\\nHuman: … \\n\\nAssistant: …``  Preference
starting "\\n\\nHuman:")      transcripts; the shared prefix is the prompt
prompt, chosen, rejected    ``trl-standard`` / ``trl-conversational``  Preference
chosen, rejected            implicit prompt: the longest common prefix Preference
prompt, response_a,         ``pairwise-winner``: two responses and a    Preference
response_b, winner          winner (a/b/tie, 1/2/0 or a response's
                            name); several annotator columns are
                            combined by majority, ties dropped
prompt, responses           ``ranking`` (best first, or sorted by      Ranking
                            ``scores`` when given)
prompt, response, rating    ``rating``                                 Rating
prompt, steps               ``steps`` (``labels`` per step, or         StepSolution
                            ``mistake_index``: first wrong step)
prompt, response|completion ``trl-standard`` / ``trl-conversational``  Demonstration
messages                    ``messages`` (last turn is the response)   Demonstration
prompt                      ``prompt``                                 PromptRecord
==========================  =======================================  ==============

A field mapping (``{"prompt": "question", "response": "answer"}``) renames input columns first, so
any column names work; ``winner=col1+col2+col3`` gathers several annotators' label columns into one
list of votes. A malformed row raises ``DataError`` naming file, line and field; with
``on_bad_record="skip"`` it is skipped and counted instead.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import read_rows
from rlhfkit.data.records import (
    KINDS,
    Demonstration,
    Preference,
    PromptRecord,
    Ranking,
    Rating,
    Record,
    StepSolution,
)

CORE_FIELDS = {"prompt", "chosen", "rejected", "margin", "responses", "scores", "response", "completion",
               "rating", "steps", "labels", "mistake_index", "correct", "messages", "system", "response_a",
               "response_b", "winner", "_response_names"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_fields(spec: str | dict | None) -> dict[str, str]:
    """``"prompt=question,response=answer"`` -> {"prompt": "question", "response": "answer"}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise DataError(f"field mapping '{part}': expected canonical=column, e.g. prompt=question")
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = value
    return out


def map_fields(row: dict, fields: dict[str, str]) -> dict:
    """Rename columns to canonical fields. ``winner=a+b+c`` gathers the columns a, b and c (one per
    annotator) into a list of votes, a missing column counting as no vote."""
    if not fields:
        return row
    taken = {c for column in fields.values() for c in column.split("+")}
    out = {k: v for k, v in row.items() if k not in taken}
    for canonical, column in fields.items():
        if "+" in column:
            out[canonical] = [row.get(c) for c in column.split("+")]
        elif column in row:
            out[canonical] = row[column]
    return out


# ---------------------------------------------------------------------------------------------
# detection


def detect(row: dict) -> tuple[str, str]:
    """(kind, format) for a row after field mapping."""
    keys = set(row)
    if {"response_a", "response_b", "winner"} <= keys:
        return "preference", "pairwise-winner"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if isinstance(chosen, list):
            return "preference", "trl-conversational" + ("" if "prompt" in keys else "-implicit")
        if "prompt" not in keys and isinstance(chosen, str) and _is_hh(chosen):
            return "preference", "hh-rlhf"
        return "preference", "trl-standard" + ("" if "prompt" in keys else "-implicit")
    if "responses" in keys:
        return "ranking", "ranking"
    if _solutions_by_model(row):
        return "steps", "solutions-by-model"
    if "steps" in keys:
        return "steps", "steps"
    if "rating" in keys and ("response" in keys or "completion" in keys):
        return "rating", "rating"
    if "messages" in keys:
        return "demonstration", "messages"
    if "prompt" in keys and ("response" in keys or "completion" in keys):
        resp = row.get("response", row.get("completion"))
        return "demonstration", "trl-conversational" if isinstance(resp, list) else "trl-standard"
    if "prompt" in keys:
        return "prompt", "prompt"
    raise DataError(
        f"cannot tell the format from fields {sorted(keys)}: expected e.g. prompt/chosen/rejected, "
        f"prompt/response, messages, prompt/responses, prompt/response/rating or prompt/steps; "
        f"map your column names with --fields prompt=your_column,..."
    )


# Which stored kinds can serve a requested kind (e.g. SFT on the chosen side of preferences).
CONVERTIBLE = {
    "prompt": {"prompt", "demonstration", "preference", "ranking", "rating", "steps"},
    "demonstration": {"demonstration", "preference", "ranking"},
}


def _solutions_by_model(row: dict) -> dict:
    """GSM8K verifier data (Cobbe et al. 2021): {"question", "ground_truth", "<solver>": {"solution",
    "is_correct"}, ...}: one row holds several models' solutions to one question."""
    return {k: v for k, v in row.items() if isinstance(v, dict) and {"solution", "is_correct"} <= set(v)}


def _is_hh(text: str) -> bool:
    return text.lstrip(" ").startswith(("\n\nHuman:", "Human:"))


# ---------------------------------------------------------------------------------------------
# field parsers: each raises DataError("<where>: field '<name>': ...")


def _err(where: str, name: str, msg: str) -> DataError:
    return DataError(f"{where}: field '{name}': {msg}")


def _text(row: dict, name: str, where: str, allow_empty: bool = True) -> str:
    if name not in row or row[name] is None:
        raise _err(where, name, "missing")
    value = row[name]
    if isinstance(value, list):  # a conversational response: [{"role": "assistant", "content": ...}]
        msgs = _messages(value, name, where)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _err(where, name, "expected one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str):
        raise _err(where, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _err(where, name, "empty")
    return value


def _messages(value, name: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise _err(where, name, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _err(where, f"{name}[{i}]", "expected {\"role\": str, \"content\": str}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(row: dict, where: str) -> list[dict]:
    if "prompt" not in row or row["prompt"] is None:
        raise _err(where, "prompt", "missing")
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise _err(where, "prompt", "empty")
        msgs = parse_hh(value) if _is_hh(value) else [{"role": "user", "content": value}]
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs = msgs[:-1]  # an HH prompt ends with "Assistant:" awaiting the answer
    else:
        msgs = _messages(value, "prompt", where)
        if not msgs:
            raise _err(where, "prompt", "empty list of messages")
    system = row.get("system")
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def _number(row: dict, name: str, where: str, required: bool = True) -> float | None:
    value = row.get(name)
    if value is None or value == "":
        if required:
            raise _err(where, name, "missing")
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _err(where, name, f"expected a number, got {value!r}") from None
    if out != out:
        raise _err(where, name, "NaN")
    return out


TIE = "tie"
WINNER_NAMES = {"a": "a", "1": "a", "response_a": "a", "model_a": "a", "b": "b", "2": "b", "response_b": "b",
                "model_b": "b", "tie": TIE, "0": TIE, "draw": TIE, "tie (bothbad)": TIE, "both_bad": TIE}


def winner_vote(value, name: str, where: str, names: dict[str, str]) -> str | None:
    """One annotator's label: 'a', 'b' or 'tie', or None for no vote (a missing or empty cell).
    Accepts a/b/tie, 1/2/0 (numbers or strings), or a response's name (``names``: its column name)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise _err(where, name, f"expected a/b/tie, 1/2/0 or a response's name, got {value!r}")
    if isinstance(value, (int, float)):
        if value in (0, 1, 2):
            return {0: TIE, 1: "a", 2: "b"}[int(value)]
        raise _err(where, name, f"expected 1 (a), 2 (b) or 0 (tie), got {value!r}")
    if isinstance(value, str):
        key = value.strip().lower()
        vote = names.get(value.strip()) or WINNER_NAMES.get(key)
        if vote is not None:
            return vote
    raise _err(where, name, f"expected a/b/tie, 1/2/0 or a response's name ({', '.join(sorted(names)) or 'response_a, response_b'}), "
                            f"got {value!r}")


def majority(votes: list[str]) -> tuple[str, float]:
    """(the winner, the share of votes it got): the label with the most votes; 'tie' when the votes
    themselves say tie most often or the top count is shared.

    >>> majority(["a", "a", "tie"]), majority(["a", "b"]), majority(["b"])
    (('a', 0.6666666666666666), ('tie', 0.5), ('b', 1.0))
    """
    counts = Counter(votes)
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        return TIE, n / len(votes)
    return top, n / len(votes)


class Dropped(Exception):
    """A row that is valid but holds no training signal (a tie between two responses): counted, not kept."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_hh(text: str) -> list[dict]:
    """Split an HH-RLHF transcript into messages: "\\n\\nHuman: a\\n\\nAssistant: b" ->
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip(" \n")
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_dialogues(chosen: list[dict], rejected: list[dict], where: str):
    """The shared prefix of two dialogues is the prompt. Usually they differ only in the final
    Assistant turn and each response is that turn's text. When they diverge earlier (5 of the 2,312
    HH harmless test pairs), each response is the rest of its dialogue as a list of messages, which
    the reward model scores whole (the seeds' dialogue-level reward)."""
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise _err(where, name, "the dialogue must end with an Assistant turn")
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    if chosen[k:] and rejected[k:] and chosen[k:] == rejected[k:] and len(chosen) == len(rejected):
        k = len(chosen) - 1  # identical dialogues: the last turn is the (equal) response
    if k == 0 or chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        raise _err(where, "rejected", f"chosen and rejected do not share a prompt ending before an Assistant turn (they differ at turn {k + 1})")

    def response(rest: list[dict]):
        return rest[0]["content"] if len(rest) == 1 else rest

    return chosen[:k], response(chosen[k:]), response(rejected[k:])


def _common_text_prefix(a: str, b: str) -> str:
    prefix = os.path.commonprefix([a, b])
    if prefix != a and prefix != b:  # back off to a word boundary so no word is split
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        prefix = prefix[: cut + 1] if cut >= 0 else ""
    return prefix


# ---------------------------------------------------------------------------------------------
# converters: row -> record


def to_record(row: dict, kind: str, fmt: str, where: str) -> Record | list[Record]:
    meta = {k: v for k, v in row.items() if k not in CORE_FIELDS}
    if kind == "preference" and fmt == "pairwise-winner":
        a, b = _text(row, "response_a", where), _text(row, "response_b", where)
        raw = row.get("winner")
        values = raw if isinstance(raw, list) else [raw]
        names = {n: v for n, v in (row.get("_response_names") or {}).items()}
        votes = [v for i, x in enumerate(values)
                 if (v := winner_vote(x, "winner" if len(values) == 1 else f"winner[{i}]", where, names)) is not None]
        if not votes:
            raise _err(where, "winner", "no label (every annotator column is empty)")
        winner, share = majority(votes)
        if winner == TIE:
            raise Dropped("ties_dropped")
        chosen, rejected = (a, b) if winner == "a" else (b, a)
        meta = {**meta, "winner": winner, "votes": len(votes), "agreement": round(share, 6)}
        return Preference(prompt=_prompt(row, where), chosen=chosen, rejected=rejected,
                          margin=_number(row, "margin", where, required=False), source=where, meta=meta)
    if kind == "preference":
        if fmt == "hh-rlhf":
            try:
                c, r = parse_hh(_text(row, "chosen", where)), parse_hh(_text(row, "rejected", where))
            except ValueError as e:
                raise _err(where, "chosen", f"not an HH transcript: {e}") from None
            prompt, chosen, rejected = _split_dialogues(c, r, where)
        elif fmt == "trl-conversational-implicit":
            prompt, chosen, rejected = _split_dialogues(
                _messages(row["chosen"], "chosen", where), _messages(row.get("rejected"), "rejected", where), where)
        elif fmt == "trl-standard-implicit":
            c, r = _text(row, "chosen", where), _text(row, "rejected", where)
            shared = _common_text_prefix(c, r)
            if not shared.strip():
                raise _err(where, "chosen", "no 'prompt' field and chosen/rejected share no prefix")
            prompt, chosen, rejected = [{"role": "user", "content": shared.strip()}], c[len(shared):], r[len(shared):]
        else:
            prompt, chosen, rejected = _prompt(row, where), _text(row, "chosen", where), _text(row, "rejected", where)
        margin = _number(row, "margin", where, required=False)
        return Preference(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, source=where, meta=meta)
    if kind == "ranking":
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise _err(where, "responses", "expected a list of at least 2 responses")
        texts = [_text({"responses": r}, "responses", where) for r in responses]
        if "scores" in row and row["scores"] is not None:
            scores = row["scores"]
            if not isinstance(scores, list) or len(scores) != len(texts):
                raise _err(where, "scores", f"expected {len(texts)} numbers, one per response")
            order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
            texts = [texts[i] for i in order]
        return Ranking(prompt=_prompt(row, where), responses=texts, source=where, meta=meta)
    if kind == "rating":
        resp = "response" if "response" in row else "completion"
        return Rating(prompt=_prompt(row, where), response=_text(row, resp, where),
                      rating=_number(row, "rating", where), source=where, meta=meta)
    if kind == "steps" and fmt == "solutions-by-model":
        if not isinstance(row.get("question"), str):
            raise _err(where, "question", "missing")
        out = []
        for solver, sol in _solutions_by_model(row).items():
            if not isinstance(sol["solution"], str) or not isinstance(sol["is_correct"], bool):
                raise _err(where, f"{solver}.solution", "expected a solution string and an is_correct boolean")
            steps = [s for s in sol["solution"].split("\n") if s.strip()] or [sol["solution"]]
            out.append(StepSolution(prompt=[{"role": "user", "content": row["question"]}], steps=steps,
                                    labels=[None] * len(steps), correct=sol["is_correct"], source=where,
                                    meta={"question_id": where, "solver": solver,
                                          "ground_truth": row.get("ground_truth")}))
        return out
    if kind == "steps":
        steps = row.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise _err(where, "steps", "expected a non-empty list of strings")
        labels = _step_labels(row, len(steps), where)
        correct = row.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise _err(where, "correct", f"expected true/false, got {correct!r}")
        return StepSolution(prompt=_prompt(row, where), steps=steps, labels=labels, correct=correct,
                            source=where, meta=meta)
    if kind == "demonstration":
        if fmt == "messages":
            msgs = _messages(row["messages"], "messages", where)
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise _err(where, "messages", "expected a prompt followed by a final assistant message")
            return Demonstration(prompt=msgs[:-1], response=msgs[-1]["content"], source=where, meta=meta)
        resp = "response" if "response" in row else "completion"
        return Demonstration(prompt=_prompt(row, where), response=_text(row, resp, where), source=where, meta=meta)
    return PromptRecord(prompt=_prompt(row, where), source=where, meta=meta)


def _step_labels(row: dict, n: int, where: str) -> list[int | None]:
    if row.get("labels") is not None:
        labels = row["labels"]
        if not isinstance(labels, list) or len(labels) != n:
            raise _err(where, "labels", f"expected {n} labels, one per step")
        out = []
        for i, lab in enumerate(labels):
            if isinstance(lab, bool):
                lab = 1 if lab else -1
            if lab is not None and lab not in (-1, 0, 1):
                raise _err(where, f"labels[{i}]", f"expected -1, 0, 1 or null, got {lab!r}")
            out.append(lab)
        return out
    if "mistake_index" in row:
        idx = row["mistake_index"]
        if idx is None:
            return [1] * n
        if not isinstance(idx, int) or not 0 <= idx < n:
            raise _err(where, "mistake_index", f"expected null or an index in [0, {n}), got {idx!r}")
        return [1] * idx + [-1] + [None] * (n - idx - 1)
    return [None] * n


def convert(record: Record, want: str) -> Record:
    """Serve a record of one kind where another is wanted (see CONVERTIBLE)."""
    if want == "prompt":
        return PromptRecord(prompt=record.prompt, source=record.source, meta=record.meta)
    if isinstance(record, Preference):
        return Demonstration(prompt=record.prompt, response=record.chosen, source=record.source, meta=record.meta)
    if isinstance(record, Ranking):
        return Demonstration(prompt=record.prompt, response=record.responses[0], source=record.source, meta=record.meta)
    raise AssertionError(want)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Loaded:
    """What a file held: the valid records, and an account of everything that was not used."""

    path: str
    kind: str
    format: str
    records: list[Record]
    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few messages of skipped rows
    problems: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = f"{self.path}: {len(self.records)} {self.kind} records ({self.format})"
        if self.problems.get("ties_dropped"):
            s += f"; {self.problems['ties_dropped']} ties dropped"
        if self.skipped:
            s += f"; skipped {self.skipped} malformed of {self.rows} rows, e.g. {self.errors[0]}"
        return s


def expand_paths(spec: str | Path) -> list[Path]:
    """'a.jsonl' -> [a.jsonl]; 'a.jsonl,b.jsonl' or 'dir/*.jsonl.gz' -> each file, in order."""
    import glob

    out: list[Path] = []
    for part in str(spec).split(","):
        part = part.strip()
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches:
            raise DataError(f"{part}: no file matches")
        out += [Path(m) for m in matches]
    return out


def load_records(path: str | Path, kind: str | None = None, fields: str | dict | None = None,
                 on_bad_record: str = "error", limit: int | None = None, split: str = "train") -> Loaded:
    """Read a file (or several: comma-separated or a glob) into typed records of ``kind`` (detected
    when None).

    on_bad_record: "error" raises at the first malformed row (naming file, line and field);
    "skip" skips it, counts it and keeps the first messages in ``Loaded.errors``.
    """
    paths = expand_paths(path)
    if len(paths) > 1:
        parts = [load_records(p, kind, fields, on_bad_record, None, split) for p in paths]
        kinds = {p.kind for p in parts}
        if len(kinds) > 1:
            raise DataError(f"{path}: the files hold different kinds of records: {sorted(kinds)}")
        merged = Loaded(path=str(path), kind=parts[0].kind, format="+".join(sorted({p.format for p in parts})),
                        records=[r for p in parts for r in p.records][:limit], rows=sum(p.rows for p in parts),
                        skipped=sum(p.skipped for p in parts), errors=[e for p in parts for e in p.errors][:5],
                        problems=sum((p.problems for p in parts), Counter()))
        return merged
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    mapping = parse_fields(fields)
    # a winner label may name the response column it prefers ("winner": "resp1" with response_a=resp1)
    names = {mapping[k]: k[-1] for k in ("response_a", "response_b") if k in mapping and "+" not in mapping[k]}
    stored: tuple[str, str] | None = None
    records: list[Record] = []
    out = Loaded(path=str(path), kind=kind or "?", format="?", records=records)
    for where, row in read_rows(path, split=split):
        out.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            row = map_fields(row, mapping)
            if names:
                row["_response_names"] = names
            if stored is None:
                try:
                    stored = detect(row)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
                if kind is not None and stored[0] != kind and stored[0] not in CONVERTIBLE.get(kind, ()):
                    raise DataError(f"{where}: this file holds {stored[0]} records ({stored[1]}), but {kind} records "
                                    f"are needed; map columns with --fields if it is mislabelled")
                out.kind, out.format = kind or stored[0], stored[1]
            made = to_record(row, stored[0], stored[1], where)
            made = [convert(r, out.kind) if r.__class__ is not KINDS[out.kind] else r
                    for r in (made if isinstance(made, list) else [made])]
        except Dropped as d:
            out.problems[d.reason] += 1
            continue
        except DataError as e:
            if on_bad_record == "error":
                raise
            out.skipped += 1
            if len(out.errors) < 5:
                out.errors.append(str(e))
            continue
        records.extend(made)
        if limit is not None and len(records) >= limit:
            break
    if stored is None:
        raise DataError(f"{path}: no valid records" + (f"; first error: {out.errors[0]}" if out.errors else ""))
    return out
