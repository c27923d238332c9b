"""KL estimators and KL controllers (reference §2).

The KL that ties the policy to the reference is KL[pi_theta || pi_ref] = E_{y ~ pi_theta}[log pi_theta(y) /
pi_ref(y)], estimated per sampled token from the two logprobs of that token. With
``log r = logp_ref - logp`` (Schulman 2020, "Approximating KL Divergence"):

    k1 = -log r                 unbiased, high variance, negative for about half the tokens
    k2 = (log r)^2 / 2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0; computed as expm1(log r) - log r, which
                                keeps the quadratic term when |log r| ~ 1e-6 (exp(d) - 1 - d does not)

Where the KL goes matters for the gradient (reference §2.2). *In the reward* (PPO, RLOO,
REINFORCE++: r_t = -beta*k1_t, with no gradient through the penalty) it is the unbiased reverse-KL
regularised objective. *In the loss* (GRPO: L += beta*mean_t k_t, differentiated), on-policy
E[grad k1] = 0 (no regularisation at all), E[grad k3] is the gradient of the *forward* KL
KL[pi_ref || pi_theta], and E[grad k2] is the gradient of the reverse KL KL[pi_theta || pi_ref].
``tests/test_losses_kl.py`` checks all three against autograd on a 5-token categorical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y) - log pi_ref(y) per token."""
    return logp - ref_logp


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(y) - log pi_ref(y))^2 / 2 per token."""
    return 0.5 * (logp - ref_logp) ** 2


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with r = pi_ref(y) / pi(y), as expm1(log r) - log r (never negative in fp32)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate (B, T) of the sampling policy to the reference, by name."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)


@dataclass
class FixedKL:
    """A constant KL coefficient beta (N+ details: 0.05; InstructGPT: 0.02)."""

    beta: float

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


@dataclass
class AdaptiveKL(FixedKL):
    """Ziegler et al. 2019 §2.2: steer beta so the policy's KL stays near ``target``.

        e_t = clip(KL_t / target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)

    KL_t is the batch mean of the *summed* per-token k1 of each sequence; n_steps is the number of
    episodes in the update (the batch size). lm-human-preferences: beta_0 = 0.15, target 6, horizon 10000.
    """

    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon


def kl_controller(beta: float, target: float = 0.0, horizon: int = 10000) -> FixedKL:
    """A fixed controller, or an adaptive one when ``target`` > 0."""
    return AdaptiveKL(beta, target, horizon) if target > 0 else FixedKL(beta)


def best_of_n_kl(n: int) -> float:
    """KL of the best-of-n policy to the base policy (Stiennon et al. 2020; Gao et al. 2022):

        KL_bon = log n - (n - 1) / n        (0 at n = 1; log 4 - 0.75 = 0.636 at n = 4)
    """
    return math.log(n) - (n - 1) / n
