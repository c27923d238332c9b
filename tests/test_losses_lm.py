import math

import torch

from rlhfkit.losses import IGNORE, sft_loss, token_logprobs, token_nll


def test_sft_loss_hand_value_and_prompt_mask():
    """Vocabulary 2, sequence [p, r1, r2] with p the prompt. Logits at position 0 are [0, 0]
    (predicting r1 = 1: nll = log 2 = 0.693147) and at position 1 are [0, ln 3] (predicting r2 = 0:
    p = 1/4, nll = ln 4 = 1.386294). The prompt token's label is -100 and never counted.
    Loss = (ln 2 + ln 4) / 2 = 1.5 ln 2 = 1.039721."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    assert torch.allclose(token_nll(logits, labels), torch.tensor([[math.log(2), math.log(4)]]), atol=1e-6)
    assert abs(sft_loss(logits, labels, 2).item() - 1.5 * math.log(2)) < 1e-6
    # masking the first response token as prompt removes exactly its term: ln 4 / 1
    masked = torch.tensor([[IGNORE, IGNORE, 0]])
    assert abs(sft_loss(logits, masked, 1).item() - math.log(4)) < 1e-6


def test_prompt_logits_do_not_affect_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 3, 4]])  # prompt is 3 tokens
    sft_loss(logits, labels, 2).backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 2:4].abs().sum() > 0
    assert logits.grad[0, 4].abs().sum() == 0  # the last position predicts nothing


def test_token_logprobs_temperature():
    """Logits [0, ln 3] at T=1 give p(1) = 3/4; at T=2 they become [0, ln 3 / 2]: p(1) = sqrt3/(1+sqrt3)."""
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    tokens = torch.tensor([[0, 1]])
    assert abs(token_logprobs(logits, tokens).item() - math.log(0.75)) < 1e-6
    s3 = math.sqrt(3)
    assert abs(token_logprobs(logits, tokens, temperature=2.0).item() - math.log(s3 / (1 + s3))) < 1e-6
