"""Devices and the accelerator: the one place that decides where models run.

Training stages get an ``accelerate.Accelerator`` (device, bf16 autocast, gradient accumulation, the
process group under ``accelerate launch``); models that no accelerator prepares (reward models,
judges, sampling-only policies) are moved by :func:`place` to the same device the accelerator would
pick, so nothing samples on the CPU when a GPU is there.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin

from rlhfkit.config import ModelArgs


def make_accelerator(cfg: ModelArgs, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` for this process: device, bf16 autocast, accumulation."""
    # Several stages may run one after another in one process (the pipeline, the tests), each with
    # its own precision and accumulation: start each from a fresh accelerate state. The process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_plugin=plugin)


def world_size() -> int:
    """Processes in this launch, known before the accelerator exists (set by accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_device() -> torch.device:
    """The device ``accelerate`` gives this process (a GPU when there is one, else the CPU): the same
    one a stage's ``Accelerator`` trains on."""
    return PartialState().device


def resolve_device(device: torch.device | None = None) -> torch.device:
    """``device``, or :func:`select_device` when it is None."""
    return device if device is not None else select_device()


def place(model, device: torch.device | None = None):
    """Move ``model`` to ``device`` (default: :func:`select_device`) and return it. The one place a
    model that is not prepared by an accelerator (reward models, judges, sampling-only policies)
    gets its device."""
    return model.to(resolve_device(device))
