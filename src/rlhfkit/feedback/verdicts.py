"""Judge verdicts: parsing that never raises, and MT-Bench's swap-consistency rule (Zheng et al. 2023,
arXiv 2306.05685; reference §7.4).

A pairwise judge sees (A, B) and then the same pair swapped (B, A). A response wins only when the
judge picks it in both orders; any disagreement, an explicit tie, or an unparsable answer is a tie.
The consistency rate is the share of pairs whose two verdicts agree once the swap is undone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RATING_LOOSE = re.compile(r"[Rr]ating\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)")


def parse_pairwise(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's last [[A]] / [[B]] / [[C]]; None when there is none."""
    found = PAIR.findall(text or "")
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def parse_rating(text: str, low: float = 1.0, high: float = 10.0) -> float | None:
    """The score of single-answer grading ('Rating: [[7]]'), or None when absent or outside [low, high]."""
    found = RATING.findall(text or "") or RATING_LOOSE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if low <= value <= high else None


def combine_swapped(first: str | None, second: str | None) -> str:
    """The verdict on (x, y) from the judge's verdict on (A=x, B=y) and on the swapped (A=y, B=x):
    'x' only if first == 'A' and second == 'B'; 'y' only if first == 'B' and second == 'A'; else 'tie'."""
    if first == "A" and second == "B":
        return "x"
    if first == "B" and second == "A":
        return "y"
    return "tie"


def consistent(first: str | None, second: str | None) -> bool:
    """Whether the two orders agree: (A, B), (B, A) or (tie, tie). An unparsable verdict never agrees."""
    return (first, second) in {("A", "B"), ("B", "A"), ("tie", "tie")}


def summarise_pairwise(firsts: Sequence[str | None], seconds: Sequence[str | None]) -> dict:
    """Counts of wins for x and y, ties, the consistency rate and the unparsable answers."""
    results = [combine_swapped(a, b) for a, b in zip(firsts, seconds)]
    n = len(results)
    return {"n": n, "x_wins": results.count("x"), "y_wins": results.count("y"), "ties": results.count("tie"),
            "consistency": sum(consistent(a, b) for a, b in zip(firsts, seconds)) / n if n else 0.0,
            "unparsable": sum(v is None for v in list(firsts) + list(seconds)), "results": results}
