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
conversations (from/value)  ``sharegpt`` (last turn is the response;   Demonstration
                            with chosen/rejected: a preference)        (Preference)
instruction, input, output  ``alpaca``: instruction and input joined   Demonstration
                            by a blank line, as Alpaca's template      (Preference,
                            separates them; chosen/rejected instead    PromptRecord)
                            of output: a preference; no output: a
                            prompt
prompt|instruction,         ``ultrafeedback``: completions ordered by  Ranking
completions (each with a    their score (overall_score, score or       (Preference)
response and a score)       rating); or binarised, best against a
                            random lower one or the worst
                            (``completions="best-vs-random"`` /
                            ``"best-vs-worst"``, as Zephyr's and TRL's
                            recipes do)
prompt                      ``prompt``                                 PromptRecord
==========================  =======================================  ==============

A field mapping (``{"prompt": "question", "response": "answer"}``) renames input columns first, so
any column names work; ``prompt=instruction+input`` joins text columns (by a blank line, empty ones
left out), and ``winner=col1+col2+col3`` gathers several annotators' label columns into one list of
votes. Fields a row holds that its format does not read are counted (``Loaded.unread``): kept as
metadata when they are not record fields, and reported either way, never dropped without a word. A malformed row raises ``DataError`` naming file, line and field; with
``on_bad_record="skip"`` it is skipped and counted instead.
"""

from __future__ import annotations

import os
import random
import re
import zlib
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
COMPLETIONS = ("ranking", "best-vs-random", "best-vs-worst")  # how scored multi-completion rows are read
JOIN = "\n\n"  # joined text columns (prompt=instruction+input): a blank line, as Alpaca's template
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


def map_fields(row: dict, fields: dict[str, str], where: str = "") -> dict:
    """Rename columns to canonical fields. ``winner=a+b+c`` gathers the columns a, b and c (one per
    annotator) into a list of votes, a missing column counting as no vote; any other ``x=a+b`` joins the
    text columns a and b by a blank line (:data:`JOIN`), leaving out missing or empty ones.

    >>> map_fields({"instruction": "Translate.", "input": "chat", "output": "cat"}, {"prompt": "instruction+input"})
    {'output': 'cat', 'prompt': 'Translate.\\n\\nchat'}
    """
    if not fields:
        return row
    taken = {c for column in fields.values() for c in column.split("+")}
    out = {k: v for k, v in row.items() if k not in taken}
    for canonical, column in fields.items():
        if "+" in column and canonical == "winner":
            out[canonical] = [row.get(c) for c in column.split("+")]
        elif "+" in column:
            parts = []
            for c in column.split("+"):
                value = row.get(c)
                if value is not None and not isinstance(value, str):
                    raise _err(where, c, f"--fields {canonical}={column} joins text columns; '{c}' holds a "
                                         f"{type(value).__name__}")
                if value and value.strip():
                    parts.append(value.strip())
            if parts:
                out[canonical] = JOIN.join(parts)
        elif column in row:
            out[canonical] = row[column]
    return out


# ---------------------------------------------------------------------------------------------
# detection


def detect(row: dict, completions: str = "ranking") -> tuple[str, str]:
    """(kind, format) for a row after field mapping. ``completions``: how a row of scored completions
    (UltraFeedback) is read, as a ranking or binarised into a preference (:data:`COMPLETIONS`)."""
    keys = set(row)
    if "conversations" in keys:
        return ("preference", "sharegpt") if {"chosen", "rejected"} <= keys else ("demonstration", "sharegpt")
    if "completions" in keys and isinstance(row["completions"], list) and ("prompt" in keys or "instruction" in keys):
        return ("ranking", "ultrafeedback") if completions == "ranking" else ("preference", f"ultrafeedback-{completions}")
    if "instruction" in keys and "prompt" not in keys:
        if {"chosen", "rejected"} <= keys:
            return "preference", "alpaca"
        return ("demonstration", "alpaca") if "output" in keys else ("prompt", "alpaca")
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
        f"prompt/response, messages, conversations (ShareGPT), instruction/input/output (Alpaca), "
        f"prompt/completions (UltraFeedback), prompt/responses, prompt/response/rating or prompt/steps; "
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
# the formats people bring, rewritten as the canonical fields the converters read

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
SCORE_KEYS = ("overall_score", "score", "rating")  # a completion's score, in this order of preference


def _sharegpt_turn(turn, name: str, where: str) -> dict:
    if isinstance(turn, str):
        return {"role": "assistant", "content": turn}
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise _err(where, name, 'expected {"from": ..., "value": str}')
    role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
    if role is None:
        raise _err(where, f"{name}.from", f"expected one of {', '.join(sorted(SHAREGPT_ROLES))}, got {turn.get('from')!r}")
    return {"role": role, "content": turn["value"]}


def _sharegpt(row: dict, kind: str, where: str) -> dict:
    """ShareGPT (``conversations``: [{"from": "human"|"gpt"|"system", "value": ...}]) as ``messages``, or, with
    ``chosen``/``rejected`` turns (LLaMA-Factory's preference form), as a prompt and two responses."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _err(where, "conversations", "expected a non-empty list of turns")
    msgs = [_sharegpt_turn(t, f"conversations[{i}]", where) for i, t in enumerate(turns)]
    rest = {k: v for k, v in row.items() if k not in ("conversations", "chosen", "rejected")}
    if kind == "preference":
        chosen, rejected = (_sharegpt_turn(row[k], k, where) for k in ("chosen", "rejected"))
        return {**rest, "prompt": msgs, "chosen": chosen["content"], "rejected": rejected["content"]}
    return {**rest, "messages": msgs}


def _alpaca(row: dict, kind: str, where: str) -> dict:
    """Alpaca (``instruction``, optional ``input``, ``output``; ``system`` and ``history`` of earlier
    [question, answer] pairs as LLaMA-Factory writes them): the prompt is the instruction and the input
    joined by a blank line, as Alpaca's template separates them."""
    parts = []
    for name in ("instruction", "input"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise _err(where, name, f"expected a string, got {type(value).__name__}")
        if value and value.strip():
            parts.append(value.strip())
    if not parts:
        raise _err(where, "instruction", "empty")
    msgs = []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise _err(where, f"history[{i}]", "expected [question, answer]")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    msgs.append({"role": "user", "content": JOIN.join(parts)})
    rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output", "history")}
    if kind == "demonstration":
        return {**rest, "prompt": msgs, "response": row["output"]}
    return {**rest, "prompt": msgs}


def _completion_score(completion: dict, i: int, where: str) -> tuple[str, float]:
    if not isinstance(completion, dict):
        raise _err(where, f"completions[{i}]", "expected {\"response\": str, \"overall_score\": number}")
    text = completion.get("response", completion.get("text"))
    if not isinstance(text, str):
        raise _err(where, f"completions[{i}].response", "missing")
    key = next((k for k in SCORE_KEYS if completion.get(k) is not None), None)
    if key is None:
        raise _err(where, f"completions[{i}]", f"no score: expected one of {', '.join(SCORE_KEYS)}")
    return text, _number(completion, key, f"{where}: completions[{i}]")


def _ultrafeedback(row: dict, fmt: str, where: str) -> dict:
    """UltraFeedback-style rows (a prompt, or ``instruction``, and ``completions``, each a response with a
    score): a ranking by score (``responses`` and ``scores``), or binarised into one preference: the best
    against a random lower-scored one (Zephyr's recipe; the draw depends only on the row's place, so a
    re-read gives the same pairs) or against the worst. A row whose completions all score the same
    holds no preference: dropped and counted as a tie."""
    items = row["completions"]
    if len(items) < 2:
        raise _err(where, "completions", "expected at least 2 completions")
    scored = [_completion_score(c, i, where) for i, c in enumerate(items)]
    rest = {k: v for k, v in row.items() if k not in ("completions", "instruction")}
    rest["prompt"] = row.get("prompt", row.get("instruction"))
    if fmt == "ultrafeedback":
        return {**rest, "responses": [t for t, _ in scored], "scores": [x for _, x in scored]}
    best = max(range(len(scored)), key=lambda i: scored[i][1])
    lower = [i for i in range(len(scored)) if scored[i][1] < scored[best][1]]
    if not lower:
        raise Dropped("ties_dropped")
    if fmt.endswith("best-vs-worst"):
        other = min(lower, key=lambda i: scored[i][1])
    else:
        other = random.Random(zlib.crc32(where.encode())).choice(lower)
    return {**rest, "chosen": scored[best][0], "rejected": scored[other][0],
            "chosen_score": scored[best][1], "rejected_score": scored[other][1]}


def canonical(row: dict, kind: str, fmt: str, where: str) -> tuple[dict, str]:
    """A row of a format people bring (ShareGPT, Alpaca, UltraFeedback) rewritten in the canonical fields,
    with the canonical format its converter reads; other rows as they are."""
    if fmt == "sharegpt":
        return _sharegpt(row, kind, where), ("trl-conversational" if kind == "preference" else "messages")
    if fmt == "alpaca":
        return _alpaca(row, kind, where), ("trl-standard" if kind != "prompt" else "prompt")
    if fmt.startswith("ultrafeedback"):
        return _ultrafeedback(row, fmt, where), ("ranking" if fmt == "ultrafeedback" else "trl-standard")
    return row, fmt


# the canonical fields each (kind, format) reads; any other record field a row holds is unread
READS = {
    ("preference", "pairwise-winner"): {"prompt", "system", "response_a", "response_b", "winner", "margin", "_response_names"},
    ("preference", "hh-rlhf"): {"chosen", "rejected", "margin"},
    ("preference", "trl-conversational-implicit"): {"chosen", "rejected", "margin"},
    ("preference", "trl-standard-implicit"): {"chosen", "rejected", "margin"},
    ("preference", "trl-standard"): {"prompt", "system", "chosen", "rejected", "margin"},
    ("preference", "trl-conversational"): {"prompt", "system", "chosen", "rejected", "margin"},
    ("ranking", "ranking"): {"prompt", "system", "responses", "scores"},
    ("rating", "rating"): {"prompt", "system", "response", "completion", "rating"},
    ("steps", "steps"): {"prompt", "system", "steps", "labels", "mistake_index", "correct"},
    ("demonstration", "messages"): {"messages"},
    ("demonstration", "trl-standard"): {"prompt", "system", "response", "completion"},
    ("demonstration", "trl-conversational"): {"prompt", "system", "response", "completion"},
    ("prompt", "prompt"): {"prompt", "system"},
    ("demonstration", "sharegpt"): {"conversations"},
    ("preference", "sharegpt"): {"conversations", "chosen", "rejected"},
    ("demonstration", "alpaca"): {"instruction", "input", "output", "history", "system"},
    ("preference", "alpaca"): {"instruction", "input", "chosen", "rejected", "history", "system", "margin"},
    ("prompt", "alpaca"): {"instruction", "input", "history", "system"},
    **{(kind, fmt): {"prompt", "instruction", "completions", "system"}
       for kind, fmt in [("ranking", "ultrafeedback"), *(("preference", f"ultrafeedback-{c}") for c in COMPLETIONS[1:])]},
}


def unread_fields(row: dict, kind: str, fmt: str) -> list[str]:
    """The fields of a row (after field mapping) that its detected format does not read: record fields it
    ignores, and columns that are not record fields (kept as the record's metadata)."""
    reads = READS.get((kind, fmt))
    if reads is None:  # solutions-by-model: every column is the format's
        return []
    return sorted(k for k in row if k not in reads and not k.startswith("_"))


# ---------------------------------------------------------------------------------------------
# converters: row -> record


def to_record(row: dict, kind: str, fmt: str, where: str) -> Record | list[Record]:
    """A record of ``kind`` from a row in the canonical fields of ``fmt`` (see :func:`canonical`)."""
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
    unread: Counter = field(default_factory=Counter)  # field -> rows holding it that the format does not read

    def ignored(self) -> dict[str, int]:
        """Record fields rows held that their format does not read (e.g. a 'response' beside chosen and
        rejected): not in any record, so every stage says so."""
        return {k: n for k, n in sorted(self.unread.items()) if k in CORE_FIELDS}

    def summary(self) -> str:
        s = f"{self.path}: {len(self.records)} {self.kind} records ({self.format})"
        if self.problems.get("ties_dropped"):
            s += f"; {self.problems['ties_dropped']} ties dropped"
        if self.ignored():
            s += "; not read by this format: " + ", ".join(f"{k} ({n} rows)" for k, n in self.ignored().items())
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
                 on_bad_record: str = "error", limit: int | None = None, split: str = "train",
                 completions: str = "ranking") -> Loaded:
    """Read a file (or several: comma-separated or a glob) into typed records of ``kind`` (detected
    when None).

    on_bad_record: "error" raises at the first malformed row (naming file, line and field);
    "skip" skips it, counts it and keeps the first messages in ``Loaded.errors``.
    completions: how rows of scored completions (UltraFeedback) are read (:data:`COMPLETIONS`).
    """
    if completions not in COMPLETIONS:
        raise ValueError(f"completions must be one of {', '.join(COMPLETIONS)}, got {completions!r}")
    paths = expand_paths(path)
    if len(paths) > 1:
        parts = [load_records(p, kind, fields, on_bad_record, None, split, completions) for p in paths]
        kinds = {p.kind for p in parts}
        if len(kinds) > 1:
            raise DataError(f"{path}: the files hold different kinds of records: {sorted(kinds)}")
        merged = Loaded(path=str(path), kind=parts[0].kind, format="+".join(sorted({p.format for p in parts})),
                        records=[r for p in parts for r in p.records][:limit], rows=sum(p.rows for p in parts),
                        skipped=sum(p.skipped for p in parts), errors=[e for p in parts for e in p.errors][:5],
                        problems=sum((p.problems for p in parts), Counter()),
                        unread=sum((p.unread for p in parts), Counter()))
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
            row = map_fields(row, mapping, where)
            if names:
                row["_response_names"] = names
            if stored is None:
                try:
                    stored = detect(row, completions)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
                if kind is not None and stored[0] != kind and stored[0] not in CONVERTIBLE.get(kind, ()):
                    hint = ("; read its completions as pairs with --completions best-vs-random (or best-vs-worst)"
                            if stored[1] == "ultrafeedback" and kind == "preference" else
                            "; map columns with --fields if it is mislabelled")
                    raise DataError(f"{where}: this file holds {stored[0]} records ({stored[1]}), but {kind} records "
                                    f"are needed{hint}")
                out.kind, out.format = kind or stored[0], stored[1]
            unread = unread_fields(row, *stored)
            canonical_row, fmt = canonical(row, stored[0], stored[1], where)
            made = to_record(canonical_row, stored[0], fmt, where)
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
        out.unread.update(unread)
        if limit is not None and len(records) >= limit:
            break
    if stored is None:
        raise DataError(f"{path}: no valid records" + (f"; first error: {out.errors[0]}" if out.errors else ""))
    return out
