"""Rollout engines: what generates responses for the RL stages, best-of-n, labelling, evaluation and
the local judge.

An engine takes chat-templated prompt token ids and returns a :class:`Rollout` whose ``logprobs`` are
the sampler's temperature-scaled logprobs of the tokens it drew (reference §1c item 10, §8 item 4),
the quantity the trainer recomputes. Engines that keep their own copy of the weights (a vLLM engine)
are told about every optimiser step through ``sync_weights(policy)``; the in-process engine reads
the policy's live weights and does nothing there.

Every caller gets its engine from :func:`make_engine`, which also owns the device: the model is
moved to the device ``accelerate`` selects for this process (a GPU when there is one), so no stage
can sample on the CPU by forgetting a ``.to``. A new engine is one class behind this interface and
one entry in :data:`ENGINES`.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models import disable_dropout, load_causal_lm
from rlhfkit.platform.distributed import is_sharded
from rlhfkit.platform.placement import place, resolve_device
from rlhfkit.rollout.sampler import Rollout, sample


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch. ``temperature=0`` is greedy (logprobs then at T = 1); ``min_new_tokens``
    forbids EOS before that many tokens."""

    pad_id: int
    eos_id: int
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0


class RolloutEngine:
    """The interface. ``generate`` samples one response per prompt; ``sync_weights`` hands the engine the
    policy's weights after an optimiser step (a no-op for engines that read the live model)."""

    name: str = "engine"
    device: torch.device

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None, on_token=None) -> Rollout:
        """One response per prompt. ``generator`` is one generator for the batch or a list of one per prompt
        (each response then depends on its own stream alone). ``on_token(tokens, logprobs, live)``, when given, is called with each
        step's (B,) tokens as they are drawn (engines that cannot stream call it once per token at the end)."""
        raise NotImplementedError

    def sync_weights(self, policy) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Make the engine sample from ``policy``'s current weights."""


class HFEngine(RolloutEngine):
    """The in-process engine: batched KV-cache sampling with the model itself (:func:`sample`).

    ``adapter_off=True`` samples from the model with its LoRA adapter switched off: the frozen
    reference policy without a second copy of the weights. On the CPU the decoding steps use linear
    weights packed for oneDNN (:class:`~rlhfkit.platform.kernels.PackedLinear`), kept here between
    calls and remade when training changes a weight; they cost one more copy of those weights."""

    name = "hf"

    def __init__(self, model, device: torch.device, adapter_off: bool = False):
        self.model, self.device, self.adapter_off = model, device, adapter_off
        # FSDP2 gathers a sharded model's weights into new storage at every step and keeps their version
        # counters: packed copies could not tell they went stale, so a sharded model decodes with the plain kernels
        self.packed: dict | None = None if is_sharded(model) else {}

    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams, generator=None, on_token=None) -> Rollout:
        ctx = self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        with ctx:
            return sample(self.model, prompts, params.pad_id, params.eos_id, max_new_tokens=params.max_new_tokens,
                          temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          min_new_tokens=params.min_new_tokens, generator=generator, on_token=on_token,
                          packed=self.packed)

    def sync_weights(self, policy) -> None:
        """Nothing to do: the engine samples from the live model."""


# Each engine as "module:class", imported when asked for: vLLM (rollout/vllm.py) is an optional install, and
# a new engine is one class and one entry here.
ENGINES: dict[str, str] = {"hf": "rlhfkit.rollout.engine:HFEngine", "vllm": "rlhfkit.rollout.vllm:VLLMEngine"}


def make_engine(kind: str, model, device: torch.device | None = None, adapter_off: bool = False) -> RolloutEngine:
    """The rollout engine ``kind`` (the config's ``rollout`` field) over ``model``, which it moves to
    ``device`` (default: the accelerator's)."""
    if kind not in ENGINES:
        raise ConfigError(f"rollout: unknown engine {kind!r}; known: {', '.join(ENGINES)}")
    device = resolve_device(device)
    module, name = ENGINES[kind].split(":")
    engine = getattr(importlib.import_module(module), name)
    return engine(place(model, device), device, adapter_off=adapter_off)


def load_engine(kind: str, spec: str, device: torch.device | None = None, seed: int = 0):
    """A model loaded for sampling only (dropout off, eval mode) on the rollout engine ``kind``, and its
    tokenizer: what bon, label, eval policy, the local judge and the policy server sample with."""
    model, tokenizer = load_causal_lm(spec, seed=seed)
    disable_dropout(model)
    return make_engine(kind, model.eval(), device), tokenizer
