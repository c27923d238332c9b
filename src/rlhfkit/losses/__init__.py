"""Losses as small pure functions: the maths and the paper are in each docstring."""

from rlhfkit.losses.lm import IGNORE, sft_loss, token_logprobs, token_nll

__all__ = ["IGNORE", "sft_loss", "token_logprobs", "token_nll"]
