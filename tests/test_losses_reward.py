import math

import torch

from rlhfkit.losses.preference import bradley_terry, centering, margin_loss, per_prompt_pairs, plackett_luce
from rlhfkit.losses.supervision import (
    class_reward,
    ordinal_classes,
    orm_bce,
    prm_aggregate,
    prm_cross_entropy,
    rating_classification,
    rating_regression,
)
from rlhfkit.models.groups import step_label_class

T = torch.tensor


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) < tol


def test_bradley_terry_hand_value():
    """r_c - r_r = 1 -> -log sigma(1) = log(1 + e^-1) = 0.313262; r_c - r_r = -2 -> log(1 + e^2) = 2.126928.
    Mean = 1.220095. Swapping the arguments changes it (the sign of the difference matters)."""
    loss = bradley_terry(T([2.0, 0.0]), T([1.0, 2.0]))
    assert close(loss, (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    assert close(loss, 1.220095)
    assert not close(bradley_terry(T([1.0, 2.0]), T([2.0, 0.0])), loss, 1e-2)


def test_margin_shifts_the_logit():
    """r_c - r_r = 1 with margin 1 -> -log sigma(0) = log 2 = 0.693147; margin 0 is Bradley-Terry."""
    assert close(margin_loss(T([2.0]), T([1.0]), T([1.0])), math.log(2))
    assert close(margin_loss(T([2.0]), T([1.0]), T([0.0])), bradley_terry(T([2.0]), T([1.0])))


def test_per_prompt_pairs_hand_value():
    """K=3 rewards [2, 1, 0] best first: pairs (2,1), (2,0), (1,0) have differences 1, 2, 1.
    L = (2 * log(1+e^-1) + log(1+e^-2)) / 3 = (2 * 0.313262 + 0.126928) / 3 = 0.251151.
    A second prompt with K=2 (third slot masked) [0, 1]: L = log(1+e^1) = 1.313262. Mean = 0.782207."""
    rewards = T([[2.0, 1.0, 0.0], [0.0, 1.0, 9.0]])
    mask = T([[True, True, True], [True, True, False]])
    assert close(per_prompt_pairs(rewards[:1]), 0.251151)
    assert close(per_prompt_pairs(rewards, mask), (0.251151 + 1.313262) / 2, 1e-5)


def test_per_prompt_pairs_with_correctness_labels():
    """Outcome labels [1, 0, 1, 0] and rewards [0, 1, 2, -1]: the pairs are correct over wrong, (0,1), (0,3),
    (2,1), (2,3), with differences -1, 1, 1, 3; the two correct ones, and the two wrong ones, are not
    compared. L = (log(1+e^1) + 2 log(1+e^-1) + log(1+e^-3)) / 4 = (1.313262 + 0.626523 + 0.048587) / 4
    = 0.497093. A prompt whose solutions are all wrong has no pair and adds 0: the mean over both is 0.248547.
    Labels that order the completions best first give the unlabelled loss."""
    rewards = T([[0.0, 1.0, 2.0, -1.0], [3.0, 1.0, 0.0, 2.0]])
    labels = T([[1, 0, 1, 0], [0, 0, 0, 0]])
    assert close(per_prompt_pairs(rewards[:1], labels=labels[:1]), 0.497093, 1e-5)
    assert close(per_prompt_pairs(rewards, labels=labels), 0.497093 / 2, 1e-5)
    ordered = T([[2.0, 1.0, 0.0]])
    assert close(per_prompt_pairs(ordered, labels=T([[3, 2, 1]])), per_prompt_pairs(ordered))


def test_plackett_luce_hand_value_and_k2_equals_bt():
    """K=3 rewards [2, 1, 0]: -log P = -(2 - log(e^2+e^1+e^0)) - (1 - log(e^1+e^0)) - 0
    = log(e^2+e+1) - 2 + log(e+1) - 1 = 2.407606 - 2 + 1.313262 - 1 = 0.720868."""
    assert close(plackett_luce(T([[2.0, 1.0, 0.0]])), 0.720868, 1e-5)
    torch.manual_seed(0)
    r = torch.randn(16, 2)
    assert close(plackett_luce(r), bradley_terry(r[:, 0], r[:, 1]), 1e-6)
    # a masked third slot reduces K=3 to K=2
    padded = torch.cat([r, torch.full((16, 1), 5.0)], 1)
    mask = torch.tensor([[True, True, False]]).expand(16, 3)
    assert close(plackett_luce(padded, mask), bradley_terry(r[:, 0], r[:, 1]), 1e-6)


def test_centering_hand_value():
    """(1 + -1)^2 = 0 and (2 + 1)^2 = 9: mean 4.5."""
    assert close(centering(T([1.0, 2.0]), T([-1.0, 1.0])), 4.5)


def test_ratings_regression_and_classification():
    """Regression: ((1-0)^2 + (0-2)^2) / 2 = 2.5. Classification with logits [0, 0, ln 2] and class good
    (index 2): -log(2/4) = log 2. Buckets with low 3, high 5: ratings 1, 3, 5, 7 -> bad, mid, mid, good.
    class_reward([0, 0, ln 2]) = 2/4 - 1/4 = 0.25."""
    assert close(rating_regression(T([1.0, 0.0]), T([0.0, 2.0])), 2.5)
    logits = T([[0.0, 0.0, math.log(2)]])
    assert close(rating_classification(logits, T([2])), math.log(2))
    assert ordinal_classes(T([1.0, 3.0, 5.0, 7.0]), 3, 5).tolist() == [0, 1, 1, 2]
    assert close(class_reward(logits), 0.25)


def test_orm_bce_hand_value():
    """Two solutions, logits 0 everywhere: every supervised token costs log 2 whatever the label.
    Solution 1 (correct) has logits [ln 3, ln 3] on 2 completion tokens: -log(3/4) each = 0.287682;
    solution 2 (wrong) has logit ln 3 on 1 token: -log(1/4) = 1.386294; a prompt token is masked.
    Mean over 3 tokens = (2 * 0.287682 + 1.386294) / 3 = 0.653886."""
    ln3 = math.log(3)
    logits = T([[9.0, ln3, ln3], [9.0, ln3, 9.0]])
    mask = T([[False, True, True], [False, True, False]])
    assert close(orm_bce(logits, T([1, 0]), mask), 0.653886, 1e-5)


def test_prm_cross_entropy_ignores_steps_after_the_first_mistake():
    """Steps labelled +1, -1, None -> classes 2, 0, -100. Logits [0,0,ln 2] for step 1 (class 2: -log(1/2)),
    [ln 2, 0, 0] for step 2 (class 0: -log(1/2)); the unlabelled third step is ignored: mean log 2."""
    labels = T([step_label_class(x) for x in (1, -1, None)])
    assert labels.tolist() == [2, 0, -100]
    ln2 = math.log(2)
    logits = T([[0.0, 0.0, ln2], [ln2, 0.0, 0.0], [50.0, -50.0, 0.0]])
    assert close(prm_cross_entropy(logits, labels), math.log(2))


def test_prm_aggregation():
    """Steps p = [0.9, 0.5, 0.8] (+ a padded fourth): product 0.36, min 0.5, last 0.8."""
    p = T([[0.9, 0.5, 0.8, 0.1]])
    mask = T([[True, True, True, False]])
    assert close(prm_aggregate(p, mask, "product"), 0.36)
    assert close(prm_aggregate(p, mask, "min"), 0.5)
    assert close(prm_aggregate(p, mask, "last"), 0.8)
