"""Agreement statistics on fixtures with known labels (missing judgements and ties included): each
value below was computed by hand, the working in the test's docstring."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("krippendorff", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")
pytest.importorskip("sklearn", reason="the annotate extra is not installed (pip install 'rlhfkit[annotate]')")

from conftest import chat  # noqa: E402
from rlhfkit.people import store  # noqa: E402
from rlhfkit.people.agreement import (  # noqa: E402
    agreement,
    cohen_pairs,
    fleiss,
    kendall_vs_others,
    kripp,
    majority_agreement,
    percent_agreement,
)
from rlhfkit.people.db import Item, Judgement, open_db  # noqa: E402
from rlhfkit.people.tasks import canonical, options_for  # noqa: E402

# Three annotators x, y, z on five pairs; z did not judge item 4; y called item 4 a tie.
PAIRS = {1: {"x": "a", "y": "a", "z": "a"}, 2: {"x": "a", "y": "b", "z": "a"}, 3: {"x": "b", "y": "b", "z": "b"},
         4: {"x": "a", "y": "tie"}, 5: {"x": "b", "y": "a", "z": "b"}}


def test_pairwise_statistics_by_hand():
    """Percent agreement: agreeing pairs per item 3, 1, 3, 0, 1 of 3, 3, 3, 1, 3 -> 8/13 = 0.615385.

    Cohen's κ, x|y on items 1-5: x = a a b a b, y = a b b tie a; p_o = 2/5; p_e = (3/5)(2/5) + (2/5)(2/5)
    + 0 = 10/25; κ = 0. x|z on items 1, 2, 3, 5: identical, κ = 1. y|z: y = a b b a, z = a a b b;
    p_o = 1/2, p_e = 1/4 + 1/4; κ = 0.

    Fleiss' κ over the four items with 3 judgements (1, 2, 3, 5), categories a, b: counts (3,0), (2,1),
    (0,3), (1,2); P_i = (Σ n_ij² − 3) / 6 = 1, 1/3, 1, 1/3, mean 2/3; p_a = p_b = 6/12, P_e = 1/2;
    κ = (2/3 − 1/2) / (1/2) = 1/3.

    Krippendorff's α nominal, all five units (14 pairable values): coincidences o_aa = 3 + 1 = 4,
    o_bb = 3 + 1 = 4, o_ab = o_ba = 1 + 1 = 2, o_a,tie = o_tie,a = 1; n_a = 7, n_b = 6, n_tie = 1.
    D_o = 6/14; D_e = 2(7·6 + 7·1 + 6·1) / (14·13) = 110/182; α = 1 − (6/14)/(110/182) = 16/55 = 0.290909.

    Against the others' majority (leave-one-out, units where the others tie left out): x: item 1 ✓,
    item 2 skipped (b vs a), 3 ✓, 4 ✗ (the other said tie), 5 skipped -> 2/3. y: 1 ✓, 2 ✗, 3 ✓, 4 ✗
    (x said a), 5 ✗ -> 2/5. z: 1 ✓, 2 and 5 skipped, 3 ✓ -> 1.
    """
    units = list(PAIRS.values())
    assert percent_agreement(units) == pytest.approx(8 / 13)
    assert cohen_pairs(units) == {"x|y": 0.0, "x|z": 1.0, "y|z": 0.0}
    assert fleiss(units) == (pytest.approx(1 / 3, abs=1e-6), 4)
    assert kripp(units, "nominal", ["a", "b", "tie"]) == pytest.approx(16 / 55, abs=1e-6)
    assert majority_agreement(units) == {"x": pytest.approx(2 / 3, abs=1e-6), "y": 0.4, "z": 1.0}


def test_likert_statistics_by_hand():
    """Two annotators rate three responses: (1, 1), (2, 3), (3, 3). Percent agreement 2/3.

    Linear-weighted Cohen's κ over the labels 1, 2, 3: observed counts (1,1), (2,3), (3,3) give
    Σ w·O = |1 − 2| = 1; row sums (1, 1, 1), column sums (1, 0, 2), N = 3, so E = [1/3, 0, 2/3] in
    every row and Σ w·E = 4/3 + 1 + 2/3 = 3; κ_w = 1 − 1/3 = 2/3.

    Krippendorff's α ordinal: coincidences o_11 = 2, o_23 = o_32 = 1, o_33 = 2; n_1 = 2, n_2 = 1,
    n_3 = 3, n = 6. δ²(c, k) = (Σ_{g=c..k} n_g − (n_c + n_k)/2)²: δ²(1,2) = 1.5² = 2.25,
    δ²(2,3) = 2² = 4, δ²(1,3) = (6 − 2.5)² = 12.25. D_o = (1·4 + 1·4)/6 = 4/3; D_e = 2(2·1·2.25 +
    2·3·12.25 + 1·3·4)/(6·5) = 6; α = 1 − (4/3)/6 = 7/9 = 0.777778 (values with no ratings add nothing).
    """
    units = [{"x": 1, "y": 1}, {"x": 2, "y": 3}, {"x": 3, "y": 3}]
    assert percent_agreement(units) == pytest.approx(2 / 3)
    assert cohen_pairs(units, weights="linear") == {"x|y": pytest.approx(2 / 3, abs=1e-6)}
    assert kripp(units, "ordinal", list(range(1, 8))) == pytest.approx(7 / 9, abs=1e-6)


def test_kendall_tau_against_the_others_by_hand():
    """Item 1: x = (1,2,3), y = (1,3,2), z = (2,1,3). x against the mean of y and z, (1.5, 2, 2.5): every
    pair concordant, τ = 1. y against (1.5, 1.5, 3): one concordant, one discordant, one tied in the
    reference; τ-b = (1 − 1)/√(3·2) = 0. z against (1, 2.5, 2.5): likewise 0.
    Item 2: x = y = (1,2,3), z = (3,2,1). x against (2, 2, 2) and y likewise: no order, left out.
    z against (1, 2, 3): reversed, τ = −1. Means: x 1, y 0, z (0 − 1)/2 = −0.5."""
    got = kendall_vs_others({1: {"x": [1, 2, 3], "y": [1, 3, 2], "z": [2, 1, 3]},
                             2: {"x": [1, 2, 3], "y": [1, 2, 3], "z": [3, 2, 1]}})
    assert got == {"x": 1.0, "y": 0.0, "z": -0.5}


@pytest.fixture
def db(tmp_path):
    return open_db(f"sqlite:///{tmp_path / 'a.db'}")


def insert(db, project: str, who: str, item: int, answer: dict, order: list[int]):
    """A judgement as the store would record it, with a chosen shown order."""
    with db.begin() as s:
        p = store.get_project(s, project)
        user = s.query(store.User).filter_by(name=who).one()
        it = s.get(Item, item)
        stored, value = canonical(p.task, answer, order, len(it.responses), p.options)
        s.add(Judgement(project_id=p.id, item_id=item, user_id=user.id, order=order, answer=stored, value=value,
                        shown_at=time.time() - 5, submitted_at=time.time()))


def pairwise_project(db):
    """The PAIRS fixture entered as judgements. x and y see every pair in the item's order, z swapped.
    Responses: items 1-3 have the longer answer first, items 4-5 second; a gold pair (answer: a).

    Position bias, over the 13 decided judgements (y's tie left out): x's left wins on items 1, 2, 4 (3),
    y's on 1, 5 (2), z's (swapped, so b shown left) on 3, 5 (2): 7/13 = 0.538462; binomial p = 1.
    Length bias: the longer wins for x on 1, 2, 5 (3), y on 1 (1), z on 1, 2, 5 (3): 7/13.
    Gold: x says a (1.0), y says b (0.0): y is flagged below 0.6, and below 0.5 against the majority (0.4).
    """
    items = [{"prompt": chat(f"q{i}"), "responses": (["a long, long answer", "short"] if i <= 3
                                                     else ["short", "a long, long answer"])} for i in range(1, 6)]
    gold = [{"prompt": chat("g"), "responses": ["right", "wrong"], "gold": {"winner": "a"}}]
    store.create_project(db, "p", "pairwise", 3, items, gold=gold, options={"strength": 1})
    for name in "xyz":
        store.add_user(db, name)
    for item, per in PAIRS.items():
        for who, winner in per.items():
            order = [1, 0] if who == "z" else [0, 1]
            item_pref = {"a": -1, "b": 1, "tie": 0}[winner]
            insert(db, "p", who, item, {"preference": item_pref if order == [0, 1] else -item_pref}, order)
    insert(db, "p", "x", 6, {"preference": -1}, [0, 1])
    insert(db, "p", "y", 6, {"preference": 1}, [0, 1])


def test_a_pairwise_project_reports_every_statistic(db):
    """(See :func:`pairwise_project`.)"""
    pairwise_project(db)
    got = agreement(db, "p")
    assert got["percent_agreement"] == pytest.approx(8 / 13, abs=1e-6)
    assert got["cohen_kappa"] == {"x|y": 0.0, "x|z": 1.0, "y|z": 0.0}
    assert got["fleiss_kappa"] == pytest.approx(1 / 3, abs=1e-6) and got["fleiss_units"] == 4
    assert got["krippendorff_alpha"] == {"nominal": pytest.approx(16 / 55, abs=1e-6)}
    assert got["agreement_with_majority"] == {"x": pytest.approx(2 / 3, abs=1e-6), "y": 0.4, "z": 1.0}
    assert got["position_bias_left_wins"] == {"share": pytest.approx(7 / 13, abs=1e-6), "n": 13, "p_value": 1.0}
    assert got["length_bias_longer_wins"]["share"] == pytest.approx(7 / 13, abs=1e-6)
    assert got["agreement_with_gold"] == {"x": {"score": 1.0, "n": 1}, "y": {"score": 0.0, "n": 1}}
    assert set(got["flagged_annotators"]) == {"y"} and len(got["flagged_annotators"]["y"]) == 2


def test_options_hold_the_thresholds():
    opts = options_for("pairwise", {"min_gold_agreement": 0.8})
    assert opts["min_gold_agreement"] == 0.8 and opts["min_majority_agreement"] == 0.5


def test_stats_and_an_export_without_the_annotators_below_gold_through_the_cli(db, tmp_path, capsys):
    from rlhfkit.cli import main

    pairwise_project(db)
    url = str(db.kw["bind"].url)
    main(["annotate", "stats", "--db", url, "--project", "p"])
    text = capsys.readouterr().out
    assert "percent agreement 0.615 (95% interval" in text and "Fleiss' kappa 0.333 (4 items)" in text
    assert "Krippendorff's alpha (nominal) 0.291" in text and "FLAGGED y" in text
    main(["annotate", "export", "--db", url, "--project", "p", "--output", str(tmp_path / "all"), "--min-votes", "2"])
    full = json.loads(capsys.readouterr().out)
    main(["annotate", "export", "--db", url, "--project", "p", "--output", str(tmp_path / "kept"), "--min-votes", "2",
          "--drop-below-gold"])
    kept = json.loads(capsys.readouterr().out)
    # y made 5 judgements and 1 gold one: all 6 go; x and z leave items 1-3 and 5 with 2 votes each
    assert full["judgements"] == 16 and kept["judgements"] == 10 and kept["judgements_dropped"] == 6
    assert kept["annotators_dropped"] == ["y"] and kept["rows"] == 4
