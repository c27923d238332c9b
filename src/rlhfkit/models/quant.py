"""QLoRA (Dettmers et al., 2023): the frozen base stored in 4-bit NF4 through bitsandbytes, a LoRA adapter
trained on top of it in higher precision. The reference policy is the quantised base with the adapter
off; the model saved as ``final/`` is the de-quantised base with the adapter merged into it, in fp32: the
network that was trained and evaluated, which transformers loads without bitsandbytes.

bitsandbytes is the ``qlora`` extra. Its CPU backend runs the 4-bit layers on a CPU (slowly); on a GPU
the CUDA kernels run.
"""

from __future__ import annotations

import copy
import logging
import sys

import torch

from rlhfkit.errors import ConfigError

EXTRA_HINT = "pip install 'rlhfkit[qlora]'"


def import_bitsandbytes():
    """bitsandbytes, imported without its hub fetch: on a CPU with AVX512-BF16 its CPU backend asks the
    Hugging Face hub for a kernel as it is imported (``kernels-community/quantization-bitsandbytes``).
    rlhfkit never fetches anything at run time, so that lookup is made to fail at once, and bitsandbytes
    uses the kernels it ships."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning about the kernel it did not fetch
    try:
        import bitsandbytes
    except ImportError as err:
        raise ConfigError(f"--load-in-4bit needs bitsandbytes, which is not installed: {EXTRA_HINT}") from err
    finally:
        quiet.setLevel(level)
        if saved is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    return bitsandbytes


def nf4_config(compute_dtype: torch.dtype):
    """The QLoRA quantisation: NF4 with double quantisation of the block scales, products computed in
    ``compute_dtype``. transformers keeps the output layer (the LM head, a reward or value head) in full
    precision, so a new head trains as usual."""
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def products_in_compute_dtype(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer's products in its compute dtype in every mode. On a CPU with AVX512-BF16,
    bitsandbytes 0.50 repacks a ``Linear4bit``'s weights the first time the layer runs in eval mode
    (sampling) and from then on, in training too, multiplies in bf16 through a fused kernel that has no
    backward pass: the sampler's logprobs would differ from the trainer's by bf16 rounding (half a logit
    on the tiny model), and no gradient would flow through the base layers to the adapters below them."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether any linear layer of ``model`` holds 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """A plain fp32 copy of a 4-bit ``model`` (LoRA or not) with every adapter merged: each adapted layer
    becomes one ``nn.Linear`` holding dequantise(W) + B A * alpha / r (peft's own dequantisation and delta),
    every other 4-bit layer its de-quantised weight (transformers' ``dequantize``). peft's own merge would
    quantise the sum back to 4 bits, which changes what the model computes."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if not isinstance(module, LoraLayer) or type(module.get_base_layer().weight).__name__ != "Params4bit":
            continue
        base = module.get_base_layer()
        weight = dequantize_bnb_weight(base.weight, state=base.weight.quant_state).float()
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            linear.bias = torch.nn.Parameter(base.bias.detach().float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, linear)
    if hasattr(plain, "merge_and_unload"):
        plain = plain.merge_and_unload()  # what is left of the adapter: modules trained in full (heads)
    quantizer = getattr(plain, "hf_quantizer", None)
    if quantizer is not None:
        if is_4bit(plain):
            plain.dequantize(dtype=torch.float32)  # the 4-bit layers LoRA did not touch; drops the config's quantisation
        else:
            quantizer.remove_quantization_config(plain)  # (dequantize fails when no 4-bit layer is left)
    return plain.float()
