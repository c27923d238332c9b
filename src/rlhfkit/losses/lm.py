"""Language-model losses on token sequences: next-token NLL, masked SFT loss, token logprobs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.data.batching import IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood with the one-position shift.

    The logprob of token t comes from the logits at t-1 (reference §8 item 10), so

        nll[b, t] = -log softmax(logits[b, t])[labels[b, t+1]]     for t = 0..T-2

    and 0 where ``labels[b, t+1] == -100`` (prompt and padding).

    logits: (B, T, V); labels: (B, T) -> (B, T-1), float32.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(shift_labels.shape)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning loss on response tokens only (Ouyang et al. 2022, stage 0):

        L = (1 / N) * sum_{b, t : labels[b, t+1] != -100} -log p(labels[b, t+1] | x[b, <=t])

    ``num_tokens`` = N is the number of supervised tokens in the whole optimiser step (all
    micro-batches and processes), not in this micro-batch. Dividing each micro-batch's sum by the
    global N makes the gradient of (batch 8) equal to (batch 1 x accumulation 8) with variable lengths
    (reference §8 item 9); a per-micro-batch mean would weight short sequences more.
    """
    return token_nll(logits, labels).sum() / num_tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(tokens[t+1] | tokens[<=t]) at ``temperature``: log_softmax(logits[:, t] / T)[tokens[:, t+1]].

    The same T as sampling must be used (reference §1c item 10, §8 item 4).
    logits: (B, T, V); tokens: (B, T) -> (B, T-1).
    """
    scaled = logits[:, :-1].float() / temperature
    return scaled.gather(-1, tokens[:, 1:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
