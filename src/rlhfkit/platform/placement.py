"""Where models run and in which precision: the accelerator, the device, and ``--mixed-precision auto``.

Training stages get an ``accelerate.Accelerator`` (device, autocast, gradient accumulation, the process
group under ``accelerate launch``); models that no accelerator prepares (reward models, judges,
sampling-only policies) are moved by :func:`place` to the same device the accelerator would pick, so
nothing samples on the CPU when a GPU is there.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs

from rlhfkit.config import ModelArgs
from rlhfkit.platform.distributed import (
    configure_deepspeed,
    deepspeed_requested,
    fsdp_requested,
    shard_on_cpu,
)
from rlhfkit.platform.kernels import (
    bf16_products_through_fp32,
    cpu_bf16_units,
    cpu_has_native_bf16,
    onednn_limit_without_bf16,
)


def resolve_precision(requested: str) -> tuple[str, str]:
    """The precision a stage runs in, and why: ``(choice, reason)``, choice one of 'no' (fp32), 'fp16', 'bf16'.

    ``auto`` follows the hardware this process runs on:

    - a GPU with bf16 (Ampere and newer): bf16 autocast;
    - a GPU without bf16 (T4, V100): fp16 autocast with dynamic loss scaling (the loss is multiplied by a
      scale before the backward pass; a step whose gradients overflow is skipped and the scale halved,
      and the scale grows again after a run of finite steps);
    - a CPU with bf16 units (AVX512-BF16 or AMX on x86, BF16 on Arm): bf16 autocast;
    - a CPU without them (most laptops: AVX2 only): fp32, since bf16 products there go through
      conversions to the fp32 kernels and cost more time than they save (``bench/bf16_cpu.py``).

    Any other value is kept as asked.
    """
    if requested != "auto":
        return requested, "asked for"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"auto: {torch.cuda.get_device_name()} has bf16"
        return "fp16", f"auto: {torch.cuda.get_device_name()} has no bf16, fp16 with loss scaling"
    if cpu_has_native_bf16():
        return "bf16", f"auto: this CPU has bf16 units: {', '.join(cpu_bf16_units() or ['flags unread'])}"
    limit = onednn_limit_without_bf16()
    where = f"oneDNN is limited to {limit} (ONEDNN_MAX_CPU_ISA)" if limit else "this CPU has no bf16 units"
    return "no", f"auto: {where}, where bf16 products go through fp32 kernels and cost more"


def precision_text(choice: str, reason: str) -> str:
    """How a stage's start line names its precision: ``fp32 (this CPU has no bf16 units ...)``."""
    return f"{'fp32' if choice == 'no' else choice} ({reason})"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a resolved precision computes in under autocast (None for fp32): frozen weights are
    stored in it."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def make_accelerator(cfg: ModelArgs, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` for this process: device, autocast in ``cfg.mixed_precision`` (``auto``
    resolved here when the stage has not resolved it yet), accumulation. On a CPU without bf16 units, a
    forced bf16 runs its matrix products through the fp32 kernels (:func:`bf16_products_through_fp32`)."""
    cfg.mixed_precision = resolve_precision(cfg.mixed_precision)[0]
    if cfg.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        bf16_products_through_fp32()
    # Several stages may run one after another in one process (the pipeline, the tests), each with
    # its own precision and accumulation: start each from a fresh accelerate state. The process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False)
    # the stages step their schedule once per optimiser step themselves: accelerate's scheduler wrapper
    # would step it once per process (it assumes the per-process batch grows with the world)
    zero_on_cpu = cpu_launch() and deepspeed_requested()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_plugin=plugin,
                              cpu=cpu_launch() and not zero_on_cpu, step_scheduler_with_optimizer=False,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if zero_on_cpu else None)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        shard_on_cpu(accelerator, cfg.mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin, cfg, grad_accum)
    elif cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        scale_losses_on_cpu(accelerator)
    return accelerator


def scale_losses_on_cpu(accelerator) -> None:
    """fp16 on a CPU as on a GPU: fp16 autocast and a dynamic loss scaler (``torch.amp.GradScaler``).
    accelerate 1.16 leaves fp16 off on CPUs without a word (no autocast, no scaler: the run is fp32).
    fp16 buys a CPU nothing (``auto`` never picks it there); this makes ``--mixed-precision fp16`` mean
    the same thing everywhere, and lets the loss-scaling path (a step skipped on overflow, the scale
    halved, then grown again) run and be tested on a machine without a GPU. accelerate then scales the
    loss in ``backward``, unscales before clipping and steps through the scaler, as on a GPU."""
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")


def cpu_launch() -> bool:
    """Whether this process is one of several launched on a machine without an accelerator.

    ``accelerate launch`` with a GPU config (``configs/accelerate/ddp.yaml``, ``fsdp2.yaml``) starts the
    processes with torchrun but, finding no GPU, leaves each one on its own (no process group): every
    rank would train alone and write the same run. On such a machine the processes join a gloo group
    instead, as ``accelerate launch --cpu`` would have them do."""
    accelerator_there = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world_size() > 1 and not accelerator_there


def end_processes() -> None:
    """Under a launch, wait for every process to finish its stage, then close the process group: a
    process that exits while the others still write (the main process saves final/) would otherwise
    abort in gloo's teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in this launch, known before the accelerator exists (set by accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_device() -> torch.device:
    """The device ``accelerate`` gives this process (a GPU when there is one, else the CPU): the same
    one a stage's ``Accelerator`` trains on."""
    return PartialState(cpu=cpu_launch()).device


def resolve_device(device: torch.device | None = None) -> torch.device:
    """``device``, or :func:`select_device` when it is None."""
    return device if device is not None else select_device()


def place(model, device: torch.device | None = None):
    """Move ``model`` to ``device`` (default: :func:`select_device`) and return it. The one place a
    model that is not prepared by an accelerator (reward models, judges, sampling-only policies)
    gets its device. A model already there is left alone: ``.to`` on an FSDP2 module reshards it, which
    would undo :func:`~rlhfkit.platform.distributed.gathered`."""
    device = resolve_device(device)
    if all(t.device.type == device.type and t.device.index in (None, device.index)
           for t in [*model.parameters(), *model.buffers()]):
        return model
    return model.to(device)
