"""Devices and the accelerator: the one place that decides where models run.

Training stages get an ``accelerate.Accelerator`` (device, bf16 autocast, gradient accumulation, the
process group under ``accelerate launch``); models that no accelerator prepares (reward models,
judges, sampling-only policies) are moved by :func:`place` to the same device the accelerator would
pick, so nothing samples on the CPU when a GPU is there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs
from torch.overrides import TorchFunctionMode

from rlhfkit.config import ModelArgs
from rlhfkit.errors import ConfigError


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512-BF16 or AMX; Arm: the BF16
    extension). Without it PyTorch emulates bf16 matrix products, many times slower than fp32, and the
    stages route them through fp32 kernels instead (:func:`bf16_products_through_fp32`). True where the
    CPU's flags cannot be read (PyTorch's kernels are then left alone)."""
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.lower().startswith(("flags", "features"))
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def make_accelerator(cfg: ModelArgs, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` for this process: device, bf16 autocast, accumulation. On a CPU that
    has no native bf16, bf16 matrix products then run through fp32 kernels (:func:`bf16_products_through_fp32`)."""
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
    return accelerator


def configure_deepspeed(plugin, cfg: ModelArgs, grad_accum: int) -> None:
    """The stage's own settings in the DeepSpeed config the launch config gave: its accumulation (accelerate
    would otherwise take the config's and overrule the stage's), its clipping, and a micro-batch size
    (DeepSpeed's bookkeeping only: the stages cut their own micro-batches). Models load whole, as under
    every other strategy, unless the launch config sets ``zero3_init_flag``: accelerate registers the
    ZeRO-3 config with transformers either way, and transformers then builds every model partitioned,
    each process drawing its own random weights for its own part."""
    ds = plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = getattr(cfg, "max_grad_norm", 1.0)
    ds["train_micro_batch_size_per_gpu"] = getattr(cfg, "micro_batch_size", 1)
    if not plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def deepspeed_requested() -> bool:
    """Whether the launch config asked for DeepSpeed (``accelerate launch`` sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


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


def fsdp_requested() -> bool:
    """Whether the launch config asked for FSDP (``accelerate launch`` sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_on_cpu(accelerator, mixed_precision: str) -> None:
    """Make ``accelerator`` shard with FSDP on CPU processes (gloo).

    accelerate 1.16 sets up FSDP only on accelerator devices: ``accelerate launch --cpu`` drops the FSDP
    config, and its state puts CPU processes in plain DDP. PyTorch's FSDP2 (``fully_shard``) itself runs
    on CPU tensors over gloo, so this switches the state to FSDP with the plugin the launch config
    describes (read from the environment accelerate launch set); ``accelerator.prepare``, ``save_state``,
    ``load_state`` and ``get_state_dict`` then take accelerate's own FSDP2 paths, as on GPUs."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 is GPU-only here)")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise RuntimeError("could not switch accelerate to FSDP2 on CPU processes")


@functools.cache
def warn_once(message: str) -> None:
    print(f"rlhfkit: warning: {message}", file=sys.stderr)


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


def is_sharded(model) -> bool:
    """Whether FSDP2 shards ``model`` or a module inside it."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def place(model, device: torch.device | None = None):
    """Move ``model`` to ``device`` (default: :func:`select_device`) and return it. The one place a
    model that is not prepared by an accelerator (reward models, judges, sampling-only policies)
    gets its device. A model already there is left alone: ``.to`` on an FSDP2 module reshards it, which
    would undo :func:`~rlhfkit.train.common.gathered`."""
    device = resolve_device(device)
    if all(t.device.type == device.type and t.device.index in (None, device.index)
           for t in [*model.parameters(), *model.buffers()]):
        return model
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# CPU kernels


def _bf16_through_fp32(op):
    """A CPU kernel for aten ``op`` (mm, addmm, bmm) that, for bf16 operands, computes what a bf16 matrix
    unit computes: the bf16 operands' products and sums in fp32 (exact products: 8-bit by 8-bit
    significands fit in fp32's 24), then the result rounded to bf16 once. It runs the fp32 kernel on fp32
    copies of the operands, which exist only during the call. Other dtypes run the stock kernel (``op``'s
    ``out=`` overload, which this does not replace)."""
    out_op = getattr(torch.ops.aten, op).out

    def kernel(*args, **kwargs):  # args: the op's tensors (beta and alpha come as kwargs)
        if args[0].dtype == torch.bfloat16:
            wide = [a.float() for a in args]
            return out_op(*wide, **kwargs, out=wide[0].new_empty(0)).to(torch.bfloat16)
        return out_op(*args, **kwargs, out=args[0].new_empty(0))  # the op sizes its empty output

    return kernel


_BF16_KERNELS: list = []  # the registration, held for the life of the process


def bf16_products_through_fp32() -> None:
    """From now on in this process, run bf16 matrix products on the CPU (aten ``mm``, ``addmm``,
    ``bmm``: every linear layer, forward and backward) through the fp32 kernels; see
    :func:`_bf16_through_fp32` for what is computed. For CPUs without bf16 units (no AVX512-BF16 or
    AMX), where PyTorch's own bf16 products are emulated and run many times slower than fp32
    (``bench/bf16_cpu.py`` prints this machine's figures). The tensors autograd saves stay bf16, so
    memory is what bf16 needs, plus the operands' fp32 copies during each call.
    Idempotent; other devices and dtypes are untouched."""
    if _BF16_KERNELS:
        return
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": the point of this
        warnings.simplefilter("ignore", UserWarning)
        for op in ("mm", "addmm", "bmm"):
            library.impl(op, _bf16_through_fp32(op), "CPU")
    _BF16_KERNELS.append(library)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_features: int | None = None) -> torch.Tensor:
    """``F.linear`` through oneDNN's ``mkldnn._linear_pointwise``: x (..., in) @ weight (out, in)^T + bias.
    ``weight`` is contiguous, or packed by ``mkldnn._reorder_linear_weight`` (then give ``out_features``)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out_features or weight.shape[0])


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x W^T + b forward and dL/dx = g W backward through oneDNN; dL/dW = g^T x and dL/db = sum g
    (only for trainable weights: LoRA's small matrices, or all of them in full fine-tuning) through torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(grad, weight.t().contiguous())  # g @ W
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class OneDNNLinear(TorchFunctionMode):
    """Every fp32 ``F.linear`` on the CPU, forward and backward, through oneDNN instead of the BLAS that
    ``F.linear`` calls (MKL in the PyTorch wheels). On the AMD EPYC CPUs with AVX-512 that this
    project's machines have, a (464 x 576) @ (576 x 1536) product runs at about 217 GFLOP/s through
    MKL and 510 through oneDNN (``bench/rollout.py`` prints the machine's figures), so training passes
    on the CPU take about half the time. Every training stage runs its passes in it (:func:`cpu_kernels`).
    A mode costs Python time on every torch call, which at a decoding step's few rows outweighs the
    gain: the hf engine decodes through :class:`~rlhfkit.rollout.sampler.PackedLinear` instead. The
    weights are used as they are (no copy); the results differ from MKL's by float rounding only. Under
    autocast, and for other dtypes and devices, ``F.linear`` runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                    and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")):
                return _OneDNNLinearFn.apply(x, weight, bias)
        return func(*args, **kwargs)


def cpu_kernels(device: torch.device, gradient_checkpointing: bool = False):
    """The context a stage's forward and backward passes run in: :class:`OneDNNLinear` on a CPU with
    oneDNN, nothing elsewhere. Not with gradient checkpointing, whose recomputation in the backward
    pass runs outside the mode and would not match the tensors the forward saved."""
    if device.type != "cpu" or gradient_checkpointing or not torch.backends.mkldnn.is_available():
        return contextlib.nullcontext()
    return OneDNNLinear()
