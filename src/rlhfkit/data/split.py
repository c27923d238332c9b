"""Deterministic train/eval splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def train_eval_split(items: Sequence[T], eval_size: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Shuffle indices with ``random.Random(seed)`` and hold out ``eval_size`` items (a count when
    >= 1, a fraction when < 1). The same items and seed always give the same split.

    >>> train, held = train_eval_split(list(range(10)), 3, seed=0)
    >>> len(train), len(held)
    (7, 3)
    """
    n = len(items)
    n_eval = int(eval_size) if eval_size >= 1 else round(eval_size * n)
    if not 0 <= n_eval <= n:
        raise ValueError(f"eval_size {eval_size} does not fit {n} items")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [items[i] for i in keep], [items[i] for i in held]
