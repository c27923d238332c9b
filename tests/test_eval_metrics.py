import math

import pytest

from rlhfkit.eval import metrics


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert metrics.pairwise_accuracy([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0]) == 0.5


def test_reliability_and_ece_hand_value():
    """Two pairs with r_c - r_r = ln 3 (p = 0.75) and one with -ln 3 (p = 0.25). Symmetrised points:
    (0.75, 1), (0.25, 0) twice and (0.25, 1), (0.75, 0) once. Bin [0.7, 0.8): confidence 0.75,
    frequency 2/3; bin [0.2, 0.3): confidence 0.25, frequency 1/3. ECE = |2/3 - 0.75| = 1/12."""
    ln3 = math.log(3)
    ece, rows = metrics.reliability([ln3, ln3, 0.0], [0.0, 0.0, ln3])
    assert ece == pytest.approx(1 / 12)
    assert [(r[2], r[3], r[4]) for r in rows] == [(pytest.approx(0.25), pytest.approx(1 / 3), 3),
                                                 (pytest.approx(0.75), pytest.approx(2 / 3), 3)]


def test_rewardbench_section_weighting():
    """Reasoning: math-prm up-weighted to 984 with accuracy 0.5 and one code subset of 164 at 1.0:
    (0.5 * 984 + 1.0 * 164) / 1148 = 0.571429. Chat: one subset at 0.9. Overall = mean = 0.735714."""
    out = metrics.section_scores({"math-prm": 0.5, "hep-python": 1.0, "alpacaeval-easy": 0.9},
                                 {"math-prm": 984, "hep-python": 164, "alpacaeval-easy": 100},
                                 {"Reasoning": ["math-prm", "hep-python"], "Chat": ["alpacaeval-easy"]})
    assert out["Reasoning"] == pytest.approx(656 / 1148)
    assert out["overall"] == pytest.approx((656 / 1148 + 0.9) / 2)


def test_auc_hand_values():
    """Scores [0.1, 0.4, 0.35, 0.8], labels [0, 0, 1, 1]: of the 4 positive/negative pairs, 3 are
    ordered right: AUC 0.75. A tie counts 1/2."""
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert metrics.auc([0.5, 0.5], [0, 1]) == 0.5


def test_best_of_n_tie_credit():
    """Group 1 picks a correct top; group 2 has a 2-way tie at the top with one correct: credit 1/2."""
    assert metrics.best_of_n_accuracy([[(0.9, True), (0.1, False)], [(0.5, True), (0.5, False), (0.1, True)]]) == 0.75


def test_first_wrong_step_and_bootstrap():
    assert metrics.first_wrong_step([0.1, 0.7, 0.9]) == 1
    assert metrics.first_wrong_step([0.1, 0.2]) is None
    lo, hi = metrics.bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3
