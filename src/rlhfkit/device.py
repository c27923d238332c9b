"""Devices and the accelerator: the one place that decides where models run.

Training stages get an ``accelerate.Accelerator`` (device, bf16 autocast, gradient accumulation, the
process group under ``accelerate launch``); models that no accelerator prepares (reward models,
judges, sampling-only policies) are moved by :func:`place` to the same device the accelerator would
pick, so nothing samples on the CPU when a GPU is there.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin

from rlhfkit.config import ModelArgs


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512-BF16 or AMX; Arm: the BF16
    extension). Without it PyTorch emulates bf16 matrix products, many times slower than fp32 (about
    30x on one AVX2 machine here). True where the CPU's flags cannot be read (nothing to warn about)."""
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.lower().startswith(("flags", "features"))
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def make_accelerator(cfg: ModelArgs, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` for this process: device, bf16 autocast, accumulation. Warns when
    bf16 autocast would run on a CPU that has no native bf16."""
    if cfg.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warn_once("--mixed-precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): its matrix "
                  "products are emulated and run many times slower than fp32; --mixed-precision no is faster here")
    # Several stages may run one after another in one process (the pipeline, the tests), each with
    # its own precision and accumulation: start each from a fresh accelerate state. The process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_plugin=plugin)


@functools.cache
def warn_once(message: str) -> None:
    print(f"rlhfkit: warning: {message}", file=sys.stderr)


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
