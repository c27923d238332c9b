"""``rlhfkit rm score``: add reward-model scores to a file of (prompt, response) records.

Each input row is written back out unchanged with ``reward`` added (or ``chosen_reward`` and
``rejected_reward`` for preference pairs), as JSON lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlhfkit.data import Demonstration, Preference, load_records
from rlhfkit.errors import ConfigError
from rlhfkit.models.reward import load_reward_model, score
from rlhfkit.platform.placement import place


@dataclass
class ScoreConfig:
    """Score (prompt, response) records with a reward model and write them out with their rewards."""

    model: str = ""
    """The reward model folder (a run's final/)."""
    data: str = ""
    """Records with prompt and response (or chosen and rejected)."""
    output: str = ""
    """Output .jsonl (default: <data stem>.scored.jsonl)."""
    fields: str = ""
    """Column mapping, e.g. 'prompt=question,response=answer'."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int = 1024
    """Longer sequences lose their oldest prompt tokens."""

    def resolve(self) -> ScoreConfig:
        if not self.model or not self.data:
            raise ConfigError("rm score: --model and --data are required")
        return self


def run(cfg: ScoreConfig) -> str:
    """Score the file; returns the path written."""
    cfg.resolve()
    out = score_file(cfg)
    print(f"wrote {out}")
    return out


def score_file(cfg: ScoreConfig) -> str:
    loaded = load_records(cfg.data, fields=cfg.fields)
    records = loaded.records
    if not records or not isinstance(records[0], (Demonstration, Preference)):
        raise ConfigError(f"{cfg.data}: rm score needs prompt/response or preference records, found {loaded.kind}")
    rm, tokenizer = load_reward_model(cfg.model)
    place(rm)
    prompts, responses, slots = [], [], []
    for i, r in enumerate(records):
        pairs = [("chosen_reward", r.chosen), ("rejected_reward", r.rejected)] if isinstance(r, Preference) \
            else [("reward", r.response)]
        for name, resp in pairs:
            prompts.append(r.prompt)
            responses.append(resp)
            slots.append((i, name))
    rewards = score(rm, tokenizer, prompts, responses, batch_size=cfg.batch_size, max_length=cfg.max_length)
    rows = [dict(_original(r)) for r in records]
    for (i, name), value in zip(slots, rewards):
        rows[i][name] = value
    out = cfg.output or str(cfg.data).split(".")[0] + ".scored.jsonl"
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out


def _original(record) -> dict:
    """The record as a row: its prompt, response(s) and every other field it came with."""
    row = {"prompt": record.prompt}
    if isinstance(record, Preference):
        row.update(chosen=record.chosen, rejected=record.rejected)
    else:
        row["response"] = record.response
    row.update(record.meta)
    return row
