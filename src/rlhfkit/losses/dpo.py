"""Direct preference optimisation and its variants (reference §5).

With pi* proportional to pi_ref * exp(r / beta), the KL-regularised RLHF objective gives the
implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x), and under
Bradley-Terry Z(x) cancels (Rafailov et al. 2023, arXiv 2305.18290). Every variant below is a
function of the log-ratio margin

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

where log pi(y) is the sum of the response tokens' logprobs (the prompt masked). Shapes: (B,) in, (B,) out.
``DPO_LOSSES`` maps the ``--loss`` name to its function; the stage calls ``DPO_LOSSES[name](h, beta, eps)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): L = -log sigma(beta * h). At pi = pi_ref, h = 0 and L = log 2."""
    return -F.logsigmoid(beta * h)


def cdpo(h: torch.Tensor, beta: float, eps: float = 0.1) -> torch.Tensor:
    """Conservative DPO / label smoothing (Mitchell 2023): labels flipped with probability eps,
    L = -(1 - eps) * log sigma(beta h) - eps * log sigma(-beta h)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust(h: torch.Tensor, beta: float, eps: float = 0.1) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), unbiased under a label-flip rate eps < 0.5:
    L = [-(1 - eps) * log sigma(beta h) + eps * log sigma(-beta h)] / (1 - 2 eps). eps = 0 is DPO."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036): L = (h - 1 / (2 tau))^2 with tau = beta. As in TRL
    (confirmed with the authors), h is built from *length-averaged* logprobs for IPO."""
    return (h - 1 / (2 * beta)) ** 2


def hinge(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """Normalised hinge (SLiC-HF, Zhao et al. 2023; RSO, Liu et al. 2023, arXiv 2309.06657):
    L = max(0, 1 - beta * h)."""
    return torch.relu(1 - beta * h)


DPO_LOSSES = {"sigmoid": sigmoid, "cdpo": cdpo, "robust": robust, "ipo": ipo, "hinge": hinge}
LENGTH_AVERAGED = {"ipo"}  # variants whose logprobs are averaged over response tokens, not summed


def implicit_rewards(logp_w: torch.Tensor, ref_w: torch.Tensor, logp_l: torch.Tensor, ref_l: torch.Tensor,
                     beta: float) -> dict[str, torch.Tensor]:
    """TRL's logged quantities, same names and meaning: rewards/chosen = mean beta*(log pi(y_w) - log pi_ref(y_w)),
    rewards/rejected likewise, rewards/accuracies = mean[chosen > rejected] (strict: ties count as wrong),
    rewards/margins = mean(chosen - rejected)."""
    chosen, rejected = beta * (logp_w - ref_w).detach(), beta * (logp_l - ref_l).detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean()}
