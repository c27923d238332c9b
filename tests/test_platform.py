"""The device layer: bf16 matrix products through fp32 kernels on CPUs without bf16 units."""

import json
import subprocess
import types

import pytest

import rlhfkit.platform.placement as device
from conftest import PYTHON, ROOT

# Runs in a child process: the kernels are replaced for the life of a process, and the comparison needs
# PyTorch's own bf16 kernels first.
COMPARE = r"""
import json, torch, torch.nn.functional as F
from rlhfkit.platform.kernels import bf16_products_through_fp32

torch.manual_seed(0)
x, w, b = torch.randn(3, 50, 576), torch.randn(1536, 576) * 0.05, torch.randn(1536)
p, q = torch.randn(4, 50, 64).bfloat16(), torch.randn(4, 64, 70).bfloat16()
plain = torch.randn(64, 96), torch.randn(96, 32)

def products():
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(xs, ws)                    # mm, and mm in the backward pass
        yb = F.linear(xs[0], ws, b)             # addmm
        z = torch.bmm(p, q)                     # bmm
    (y.float().square().mean() - yb.float().mean()).backward()
    return {"mm": y, "addmm": yb, "bmm": z, "grad_x": xs.grad, "grad_w": ws.grad,
            "fp32": torch.mm(*plain)}

stock = products()
bf16_products_through_fp32()
bf16_products_through_fp32()  # idempotent
routed = products()
out = {}
for k in stock:
    a, r = stock[k].float(), routed[k].float()
    # normwise, in units in the last place of the largest entry (2^-7 of it: bf16 has 8 significant
    # bits): entries near zero are sums that cancel, whose rounding depends on the order of the sums
    worst = ((a - r).abs().max() / (a.abs().max() * 2**-7)).item()
    out[k] = {"dtype": [str(stock[k].dtype), str(routed[k].dtype)], "worst_ulp": worst,
              "equal": torch.equal(a, r), "scale": a.abs().max().item()}
print(json.dumps(out))
"""


def test_bf16_products_through_fp32_equal_the_bf16_kernels_to_rounding():
    done = subprocess.run([PYTHON, "-c", COMPARE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("mm", "addmm", "bmm"):
        assert out[name]["dtype"] == ["torch.bfloat16"] * 2, (name, out[name])  # rounded to bf16, as the stock kernel
        assert out[name]["worst_ulp"] <= 1.0, (name, out[name])  # a sign error would be 256
        assert out[name]["scale"] > 1.0  # not all zeros
    for name in ("grad_x", "grad_w"):  # autocast's backward: bf16 products, fp32 gradients of fp32 leaves
        assert out[name]["dtype"] == ["torch.float32"] * 2
        assert out[name]["worst_ulp"] <= 2.0, (name, out[name])  # a sum of two bf16 products each
    assert out["fp32"]["equal"]  # other dtypes run the stock kernel, bit for bit


@pytest.mark.skipif(device.torch.cuda.is_available(), reason="on a GPU, bf16 runs on the GPU")
@pytest.mark.parametrize("native", [True, False])
def test_bf16_runs_go_through_fp32_only_on_cpus_without_bf16_units(monkeypatch, native):
    calls = []
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(device, "bf16_products_through_fp32", lambda: calls.append(1))
    for precision in ("no", "bf16"):
        device.make_accelerator(types.SimpleNamespace(mixed_precision=precision))
    assert len(calls) == (0 if native else 1)
