"""The judge's verdict parsing and MT-Bench's swap-consistency rule."""

from rlhfkit.feedback.verdicts import combine_swapped, consistent, parse_pairwise, parse_rating, summarise_pairwise


def test_parse_pairwise_never_raises():
    assert parse_pairwise("... so my verdict is [[A]]") == "A"
    assert parse_pairwise("[[A]] at first, but on reflection [[B]]") == "B"  # the last verdict counts
    assert parse_pairwise("It is a tie: [[C]]") == "tie"
    for bad in ("", None, "A is better", "[[D]]", "[A]"):
        assert parse_pairwise(bad) is None


def test_parse_rating():
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("Rating: 8.5") == 8.5
    assert parse_rating("[[11]]") is None and parse_rating("no score") is None and parse_rating(None) is None


def test_swap_consistency():
    """x wins only if picked in both orders; a flip, a tie or garbage is a tie. Four pairs:
    (A, B) x wins, consistent; (B, A) y wins, consistent; (A, A) position bias: tie, inconsistent;
    (None, B) unparsable: tie, inconsistent. Consistency 2/4, 1 unparsable answer."""
    assert combine_swapped("A", "B") == "x" and combine_swapped("B", "A") == "y"
    assert combine_swapped("A", "A") == "tie" and combine_swapped("tie", "B") == "tie" and combine_swapped(None, "B") == "tie"
    assert consistent("tie", "tie") and not consistent("A", "A") and not consistent(None, None)
    out = summarise_pairwise(["A", "B", "A", None], ["B", "A", "A", "B"])
    assert (out["x_wins"], out["y_wins"], out["ties"]) == (1, 1, 2)
    assert out["consistency"] == 0.5 and out["unparsable"] == 1
