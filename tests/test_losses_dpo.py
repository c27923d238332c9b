"""DPO and its variants against hand-computed values (reference §5)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.dpo import DPO_LOSSES, cdpo, hinge, implicit_rewards, ipo, robust, sigmoid


def test_every_variant_at_pi_equal_ref():
    """h = 0 (pi = pi_ref): sigmoid, cdpo and robust all give log 2 = 0.693147
    (robust: (0.9 log 2 - 0.1 log 2) / 0.8 = log 2); IPO gives (0 - 1/(2*0.1))^2 = 25; hinge gives 1."""
    h = torch.zeros(3)
    for fn in (sigmoid, cdpo, robust):
        torch.testing.assert_close(fn(h, 0.1, 0.1), torch.full((3,), math.log(2)))
    torch.testing.assert_close(ipo(h, 0.1), torch.full((3,), 25.0))
    torch.testing.assert_close(hinge(h, 0.1), torch.ones(3))


def test_variants_by_hand():
    """h = 2, beta = 0.5 (beta*h = 1); -log sigma(1) = 0.313262, -log sigma(-1) = 1.313262.
    sigmoid 0.313262; cdpo(0.1) = 0.9*0.313262 + 0.1*1.313262 = 0.413262;
    robust(0.1) = (0.9*0.313262 - 0.1*1.313262) / 0.8 = 0.188262; ipo = (2 - 1)^2 = 1;
    hinge = relu(1 - 1) = 0, and at h = 1: 0.5."""
    h = torch.tensor([2.0])
    assert sigmoid(h, 0.5).item() == pytest.approx(0.313262, abs=1e-6)
    assert cdpo(h, 0.5, 0.1).item() == pytest.approx(0.413262, abs=1e-6)
    assert robust(h, 0.5, 0.1).item() == pytest.approx(0.188262, abs=1e-6)
    assert ipo(h, 0.5).item() == pytest.approx(1.0)
    assert hinge(h, 0.5).item() == 0.0 and hinge(torch.tensor([1.0]), 0.5).item() == pytest.approx(0.5)
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "cdpo", "robust", "hinge"}


def test_robust_with_zero_noise_is_dpo():
    h = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(robust(h, 0.2, 0.0), sigmoid(h, 0.2))
    torch.testing.assert_close(cdpo(h, 0.2, 0.0), sigmoid(h, 0.2))


def test_implicit_rewards_and_swap():
    """beta 0.1; log-ratios chosen [1, -2], rejected [0, 0]: rewards/chosen = mean(0.1, -0.2) = -0.05,
    rejected 0, accuracies 1/2 (ties would count as wrong), margins -0.05. Swapping chosen and rejected
    flips the sign of the margins."""
    w, rw = torch.tensor([1.0, -2.0]), torch.zeros(2)
    lo, rl = torch.zeros(2), torch.zeros(2)
    out = implicit_rewards(w, rw, lo, rl, 0.1)
    assert out["rewards/chosen"].item() == pytest.approx(-0.05)
    assert out["rewards/rejected"].item() == 0.0
    assert out["rewards/accuracies"].item() == 0.5
    assert out["rewards/margins"].item() == pytest.approx(-0.05)
    swapped = implicit_rewards(lo, rl, w, rw, 0.1)
    assert swapped["rewards/margins"].item() == pytest.approx(0.05)
    tie = implicit_rewards(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1)
    assert tie["rewards/accuracies"].item() == 0.0
