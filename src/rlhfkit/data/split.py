"""Deterministic train/eval splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from rlhfkit.data.formats import load_records

T = TypeVar("T")


def train_eval_split(items: Sequence[T], eval_size: float, seed: int = 0, key=None) -> tuple[list[T], list[T]]:
    """Shuffle indices with ``random.Random(seed)`` and hold out ``eval_size`` items (a count when
    >= 1, a fraction when < 1). The same items and seed always give the same split.

    With ``key`` (item -> group), whole groups are held out (e.g. every solution of a question), and
    ``eval_size`` counts groups.

    >>> train, held = train_eval_split(list(range(10)), 3, seed=0)
    >>> len(train), len(held)
    (7, 3)
    """
    if key is not None:
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(key(item), []).append(i)
        names = list(groups)
        _, held_names = train_eval_split(names, eval_size, seed)
        held_set = set(held_names)
        return ([x for x, g in zip(items, map(key, items)) if g not in held_set],
                [x for x, g in zip(items, map(key, items)) if g in held_set])
    n = len(items)
    n_eval = int(eval_size) if eval_size >= 1 else round(eval_size * n)
    if not 0 <= n_eval <= n:
        raise ValueError(f"eval_size {eval_size} does not fit {n} items")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [items[i] for i in keep], [items[i] for i in held]


def split_records(records: list, eval_size: float, seed: int = 0, split_by: str = "") -> tuple[list, list]:
    """:func:`train_eval_split` for records, grouped by ``record.meta[split_by]`` when given."""
    key = (lambda r: r.meta.get(split_by, r.source)) if split_by else None
    return train_eval_split(records, eval_size, seed, key=key)


def load_train_eval(cfg, kind: str, log=print):
    """Training and held-out records for a stage from its data flags: ``--eval`` file, or
    ``--eval-size`` held out of ``--train`` (grouped by ``--split-by``), then ``--limit``.
    Returns (train records, held-out records, the Loaded report of --train)."""
    def load(path):
        return load_records(path, kind=kind, fields=cfg.fields, on_bad_record=cfg.on_bad_record,
                            completions=cfg.completions)

    loaded = load(cfg.train)
    log(loaded.summary())
    records, held = loaded.records, []
    if cfg.eval:
        held = load(cfg.eval).records
    elif cfg.eval_size:
        records, held = split_records(records, cfg.eval_size, cfg.split_seed, cfg.split_by)
    if cfg.limit:
        records = records[: cfg.limit]
    return records, held, loaded
