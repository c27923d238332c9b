"""``rlhfkit rm score``: add rewards to a file of (prompt, response) records, from any ``--reward`` (a
reward model, rules, an HTTP scorer or a weighted sum: the grammar every stage uses).

Each input row is written back out unchanged with ``reward`` added (or ``chosen_reward`` and
``rejected_reward`` for preference pairs), as JSON lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlhfkit.data import Demonstration, Preference, load_records
from rlhfkit.errors import ConfigError
from rlhfkit.platform.placement import select_device
from rlhfkit.rollout.rewards import parse_reward


@dataclass
class ScoreConfig:
    """Score (prompt, response) records with any reward and write them out with their rewards."""

    reward: str = ""
    """The reward: a reward model folder (a run's final/), rule:FILE.yaml, http(s)://scorer or a weighted sum
    such as '1.0*runs/rm/final + 0.5*rule:r.yaml'."""
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
        if not self.reward or not self.data:
            raise ConfigError("rm score: --reward and --data are required")
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
    reward = parse_reward(cfg.reward, cfg.batch_size, cfg.max_length, select_device())
    prompts, responses, metas, slots = [], [], [], []
    for i, r in enumerate(records):
        pairs = [("chosen_reward", r.chosen), ("rejected_reward", r.rejected)] if isinstance(r, Preference) \
            else [("reward", r.response)]
        for name, resp in pairs:
            prompts.append(r.prompt)
            responses.append(resp)
            metas.append(r.meta)
            slots.append((i, name))
    rewards = reward.score(prompts, responses, metas)
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
