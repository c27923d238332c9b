"""``rlhfkit data inspect FILE``: detected format, record counts, token-length statistics, problems."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from rlhfkit.data.formats import load_records
from rlhfkit.data.records import Demonstration, Preference, Ranking, Rating, StepSolution
from rlhfkit.data.template import encode_prompt, encode_response
from rlhfkit.models import load_tokenizer


@dataclass
class InspectConfig:
    """Report what a data file holds and what is wrong with it."""

    path: Annotated[str, tyro.conf.Positional]
    """The file (jsonl/json/csv/parquet, optionally .gz) or a save_to_disk folder."""
    kind: Literal["auto", "prompt", "demonstration", "preference", "ranking", "rating", "steps"] = "auto"
    """Record kind to read the file as ('auto': detect)."""
    fields: str = ""
    """Column mapping, e.g. 'prompt=question,response=answer'; 'prompt=instruction+input' joins columns."""
    completions: Literal["ranking", "best-vs-random", "best-vs-worst"] = "ranking"
    """Rows of scored completions (UltraFeedback): a ranking, or binarised into pairs (as the stages' flag)."""
    model: str = "smollm2-135m-instruct"
    """Tokenizer used for the length statistics."""
    max_length: int = 512
    """Records longer than this (prompt plus response, in tokens) are reported as overlong."""
    json: bool = False
    """Print the report as JSON."""


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    q = lambda f: v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": q(0.5), "p95": q(0.95), "max": v[-1]}


def _responses(record) -> list:
    if isinstance(record, Preference):
        return [record.chosen, record.rejected]
    if isinstance(record, Ranking):
        return list(record.responses)
    if isinstance(record, (Demonstration, Rating)):
        return [record.response]
    if isinstance(record, StepSolution):
        return [record.response]
    return []


def inspect(cfg: InspectConfig) -> dict:
    loaded = load_records(cfg.path, kind=None if cfg.kind == "auto" else cfg.kind, fields=cfg.fields,
                          on_bad_record="skip", completions=cfg.completions)
    tokenizer = load_tokenizer(cfg.model)
    prompt_len, response_len, total_len = [], [], []
    problems = {"chosen_equals_rejected": [], "empty_response": [], "overlong": [], "multi_turn_response": []}
    for r in loaded.records:
        p = len(encode_prompt(tokenizer, r.prompt))
        prompt_len.append(p)
        longest = 0
        for resp in _responses(r):
            n = len(encode_response(tokenizer, resp, r.prompt))
            response_len.append(n)
            longest = max(longest, n)
            text = resp if isinstance(resp, str) else " ".join(m["content"] for m in resp)
            if not text.strip():
                problems["empty_response"].append(r.source)
            if not isinstance(resp, str):
                problems["multi_turn_response"].append(r.source)
        total_len.append(p + longest)
        if p + longest > cfg.max_length:
            problems["overlong"].append(r.source)
        if isinstance(r, Preference) and r.chosen == r.rejected:
            problems["chosen_equals_rejected"].append(r.source)
    return {
        "path": cfg.path,
        "format": loaded.format,
        "kind": loaded.kind,
        "rows": loaded.rows,
        "records": len(loaded.records),
        "malformed": loaded.skipped,
        "malformed_examples": loaded.errors,
        "ties_dropped": loaded.problems.get("ties_dropped", 0),
        # fields the format does not read: record fields it ignores, other columns kept as metadata
        "unread_fields": {"ignored": loaded.ignored(),
                          "metadata": {k: n for k, n in sorted(loaded.unread.items()) if k not in loaded.ignored()}},
        "tokens": {"prompt": _stats(prompt_len), "response": _stats(response_len),
                   "prompt+longest_response": _stats(total_len), "tokenizer": cfg.model},
        "problems": {k: {"count": len(v), "examples": list(dict.fromkeys(v))[:3]} for k, v in problems.items()},
        "max_length": cfg.max_length,
    }


def render(report: dict) -> str:
    unit = "pairs" if report["kind"] == "preference" else "records"
    lines = [f"{report['path']}",
             f"  format      {report['format']}",
             f"  records     {report['records']} {report['kind']} {unit} from {report['rows']} rows"
             + (f" ({report['malformed']} malformed, skipped)" if report["malformed"] else "")
             + (f"; {report['ties_dropped']} ties dropped" if report["ties_dropped"] else "")]
    for e in report["malformed_examples"]:
        lines.append(f"    malformed: {e}")
    for label, key in (("not read", "ignored"), ("metadata", "metadata")):
        found = report["unread_fields"][key]
        if found:
            note = "record fields this format ignores" if key == "ignored" else "kept with each record, not read by the format"
            lines.append(f"  {label:<11} {', '.join(f'{k} ({n} rows)' for k, n in found.items())}: {note}")
    lines.append(f"  tokens ({report['tokens']['tokenizer']})")
    for name in ("prompt", "response", "prompt+longest_response"):
        s = report["tokens"][name]
        if s:
            lines.append(f"    {name:<24} min {s['min']:>5}  mean {s['mean']:>7}  p50 {s['p50']:>5}  "
                         f"p95 {s['p95']:>5}  max {s['max']:>5}")
    lines.append("  problems")
    labels = {"chosen_equals_rejected": "chosen == rejected", "empty_response": "empty responses",
              "overlong": f"overlong (> {report['max_length']} tokens)",
              "multi_turn_response": "responses spanning several turns"}
    for key, label in labels.items():
        p = report["problems"][key]
        lines.append(f"    {label:<34} {p['count']:>5}" + (f"   e.g. {', '.join(p['examples'])}" if p["count"] else ""))
    return "\n".join(lines)


def run(cfg: InspectConfig) -> dict:
    """Print the report (text or JSON) and return it."""
    report = inspect(cfg)
    print(json.dumps(report, indent=2) if cfg.json else render(report))
    return report
