"""CPU kernels: how the matrix products run on a CPU.

- bf16 on CPUs without bf16 units: products through the fp32 kernels (:func:`bf16_products_through_fp32`);
- training passes through oneDNN's linear instead of the BLAS ``F.linear`` calls (:class:`OneDNNLinear`,
  :func:`cpu_kernels`);
- decoding steps through weights packed once in oneDNN's blocked layout (:class:`PackedLinear`,
  :func:`decode_kernels`);
- freed memory handed back to the OS (:func:`release_freed_memory`).

Each is measured against the stock kernel on the machine at hand by ``bench/rollout.py`` and
``bench/bf16_cpu.py``; the results differ from the stock kernels' by float rounding only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512-BF16 or AMX; Arm: the BF16
    extension). Without it PyTorch emulates bf16 matrix products, many times slower than fp32, and the
    stages route them through fp32 kernels instead (:func:`bf16_products_through_fp32`). True where the
    CPU's flags cannot be read (PyTorch's kernels are then left alone)."""
    units = cpu_bf16_units()
    return units is None or bool(units)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below which its kernels use no bf16 instructions
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_limit_without_bf16() -> str:
    """The ``ONEDNN_MAX_CPU_ISA`` limit when it keeps oneDNN below every ISA with bf16 instructions, else ''."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return limit if limit in ONEDNN_ISAS_WITHOUT_BF16 else ""


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> list[str] | None:
    """The CPU flags that name bf16 units (``avx512_bf16``, ``amx_bf16``, Arm's ``bf16``), sorted; None where
    /proc/cpuinfo cannot be read. Empty when ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN, which runs PyTorch's bf16
    products on a CPU, below the ISAs that use them (``AVX2``, ``AVX512_CORE``, ...): the units are there
    but unused, as on a CPU without them."""
    if onednn_limit_without_bf16():
        return []
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.lower().startswith(("flags", "features"))
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})





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
    gain: the hf engine decodes through :class:`PackedLinear` instead. The
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


class PackedLinear(TorchFunctionMode):
    """Decoding-step linear layers on the CPU through oneDNN's prepacked linear (what torch inductor's
    freezing uses): each weight is reordered into oneDNN's blocked layout once, instead of MKL packing
    it again in every call, which at a decoding step's few rows costs as much as the product itself.

    ``cache`` maps a weight to its packed copy and outlives the mode (the engine keeps it). A copy is
    remade when its weight changes: the tensor's version counter moves at every in-place update (an
    optimiser step, a ``load_state_dict``), so sampling always follows the live weights."""

    def __init__(self, cache: dict, rows: int):
        super().__init__()
        self.cache, self.rows = cache, rows

    def packed(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of ``weight``, remade when it changed; None where oneDNN has no prepacked
        kernel for its dtype on this CPU (bf16 without AVX512-BF16 or AVX-NE-CONVERT)."""
        hit = self.cache.get(id(weight))
        if hit is None or hit[0]() is not weight or hit[1] != weight._version:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.rows)
            except RuntimeError:
                packed = None
            hit = self.cache[id(weight)] = (weakref.ref(weight), weight._version, packed)
        return hit[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # under autocast the plain kernels run: autocast casts inside F.linear, after this mode
        if func is F.linear and not torch.is_grad_enabled() and not torch.is_autocast_enabled(args[0].device.type):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            packed = self.packed(weight) if rows <= self.rows and weight.dtype == x.dtype else None
            if packed is not None:
                return onednn_linear(x, packed, bias, out_features=weight.shape[0])
        return func(*args, **kwargs)


def decode_kernels(model, rows: int, cache: dict | None):
    """The context the decoding steps run in: :class:`PackedLinear` on the CPU when ``cache`` is given,
    nothing otherwise (a GPU's own kernels are already fast at few rows)."""
    if cache is None or next(model.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return contextlib.nullcontext()
    return PackedLinear(cache, rows)


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc ``malloc_trim``). With sequences of
    varying length, CPU training otherwise keeps every size it ever allocated: resident memory
    creeps up step after step although the live tensors do not grow."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
