"""bf16 matrix products on this CPU: PyTorch's own bf16 kernels, rlhfkit's route through the fp32 kernels
(``rlhfkit.platform.kernels.bf16_products_through_fp32``, which the stages take under ``--mixed-precision bf16``
on a CPU without bf16 units), and fp32, side by side in one run.

The products are the bundled model's (SmolLM2-135M: hidden 576, MLP 1536): a linear layer's forward and
backward at a training micro-batch's rows (4 sequences x 256 tokens = 1024) and a decoding step's rows
(32 sequences, one token each). The stock bf16 kernels run first, since the route replaces them for
the rest of the process. Attention (``scaled_dot_product_attention``, 9 heads of 64), which the route
leaves to PyTorch's kernels, is timed at the same sizes (a causal 256-token prefill of 4 sequences; one
decoding step of 32 over 100 cached tokens). The median of --repeats timings of each is reported.

    .venv/bin/python bench/bf16_cpu.py

Prints one JSON line per product and precision, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from _common import timings

from rlhfkit.platform.kernels import bf16_products_through_fp32, cpu_has_native_bf16

SHAPES = {"train 1024 rows, 576 -> 1536": (1024, 576, 1536), "train 1024 rows, 1536 -> 576": (1024, 1536, 576),
          "decode 32 rows, 576 -> 1536": (32, 576, 1536)}
ATTENTION = {"attention prefill 4 x 256": ((4, 9, 256, 64), (4, 9, 256, 64), True),
             "attention decode 32 x 1 over 100": ((32, 9, 1, 64), (32, 9, 100, 64), False)}


def timed(f, repeats: int) -> float:
    return statistics.median(timings(f, repeats))


def step(rows: int, n_in: int, n_out: int, dtype, backward: bool):
    """One linear layer's product(s): y = x W^T, and for training dL/dx = g W and dL/dW = g^T x."""
    x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype) * 0.05
    g = torch.randn(rows, n_out, dtype=dtype)

    def run():
        F.linear(x, w)
        if backward:
            g @ w
            g.t() @ x
    return run


def attention(q_shape, kv_shape, causal: bool, dtype):
    q, kv = torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)
    return lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=causal)


def measure(precision: str, repeats: int, with_attention: bool = True) -> dict:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    out = {}
    for name, (rows, n_in, n_out) in SHAPES.items():
        seconds = timed(step(rows, n_in, n_out, dtype, backward=name.startswith("train")), repeats)
        out[name] = seconds
        print(json.dumps({"product": name, "precision": precision, "ms": round(seconds * 1e3, 3)}), flush=True)
    if with_attention:
        for name, (q, kv, causal) in ATTENTION.items():
            out[name] = seconds = timed(attention(q, kv, causal, dtype), repeats)
            print(json.dumps({"product": name, "precision": precision, "ms": round(seconds * 1e3, 3)}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps({"threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
                      "torch": torch.__version__}), flush=True)
    fp32 = measure("fp32", args.repeats)
    stock = measure("bf16 (PyTorch's kernels)", args.repeats)
    bf16_products_through_fp32()
    routed = measure("bf16 (through fp32)", args.repeats, with_attention=False)  # the route leaves attention alone
    for name in SHAPES:
        print(json.dumps({"product": name, "stock_bf16_over_routed": round(stock[name] / routed[name], 2),
                          "routed_over_fp32": round(routed[name] / fp32[name], 2)}))
    for name in ATTENTION:
        print(json.dumps({"product": name, "bf16_over_fp32": round(stock[name] / fp32[name], 2)}))


if __name__ == "__main__":
    main()
