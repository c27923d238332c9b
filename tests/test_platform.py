"""The platform layer: precision by the hardware (auto, fp16 loss scaling), and bf16 matrix products
through fp32 kernels on CPUs without bf16 units."""

import json
import os
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


# ------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("cuda, cuda_bf16, cpu_bf16, expected", [
    (True, True, False, "bf16"),    # Ampere and newer
    (True, False, True, "fp16"),    # T4, V100: fp16 with loss scaling
    (False, False, True, "bf16"),   # a CPU with AVX512-BF16 or AMX
    (False, False, False, "no"),    # AVX2 only: fp32
])
def test_auto_precision_follows_the_hardware(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device.torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(device.torch.cuda, "get_device_name", lambda *a: "GPU-X")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: cpu_bf16)
    choice, reason = device.resolve_precision("auto")
    assert choice == expected and reason.startswith("auto: ")
    assert ("GPU-X" in reason) == cuda
    for forced in ("no", "fp16", "bf16"):  # a forced choice is kept whatever the hardware
        assert device.resolve_precision(forced) == (forced, "asked for")


def test_fp16_scales_the_loss_skips_an_overflowing_step_and_grows_the_scale():
    """fp16 on the tiny model, on the CPU as on a GPU: the loss is multiplied by the scale before the
    backward pass; a step whose gradients overflow leaves the weights and the LR schedule alone and halves
    the scale; after ``growth_interval`` finite steps the scale doubles."""
    import torch

    from rlhfkit.config import OptimArgs
    from rlhfkit.models import load_causal_lm
    from rlhfkit.train.common import backward, build_optimizer, optimizer_step

    cfg = types.SimpleNamespace(mixed_precision="fp16")
    accelerator = device.make_accelerator(cfg)
    assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.native_amp
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)  # grows after 2
    model, _ = load_causal_lm("tiny")
    optimizer, scheduler = build_optimizer(model, OptimArgs(lr=1e-3, warmup_ratio=0.0), 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ids = torch.randint(0, 100, (2, 8))
    linear_out = []
    next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda module, args, out: linear_out.append(out.dtype))

    def step(loss_factor: float):
        with accelerator.autocast():
            out = model(input_ids=ids, labels=ids)
        assert linear_out[-1] == torch.float16  # the forward ran under fp16 autocast
        backward(accelerator, out.loss * loss_factor)
        return optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0, step=1)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr_before = scheduler.get_last_lr()[0]
    grad_norm, _ = step(1e30)  # fp16 overflows (its largest value is 65504): the step is skipped
    assert not torch.isfinite(torch.tensor(grad_norm)) and accelerator.optimizer_step_was_skipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert accelerator.scaler.get_scale() == 2.0 ** 9 and scheduler.get_last_lr()[0] == lr_before
    for _ in range(2):  # two finite steps: the weights move and the scale doubles
        grad_norm, _ = step(1.0)
        assert torch.isfinite(torch.tensor(grad_norm)) and not accelerator.optimizer_step_was_skipped
    assert accelerator.scaler.get_scale() == 2.0 ** 10
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scheduler.get_last_lr()[0] != lr_before


@pytest.mark.slow
def test_a_stage_prints_one_start_line_and_saves_the_resolved_precision(tmp_path):
    """Without --verbose a stage prints one start line (model, data, precision and why, where the run
    goes), not its config; config.yaml holds the resolved precision and the manifest the reason."""
    import yaml

    demos = ROOT / "examples" / "demonstrations.jsonl"
    argv = [PYTHON, "-m", "rlhfkit", "sft", "--model", "tiny", "--train", str(demos), "--max-steps", "1",
            "--batch-size", "2", "--micro-batch-size", "2", "--output-dir", str(tmp_path), "--no-progress",
            "--mixed-precision", "auto"]
    out = subprocess.run(argv + ["--name", "quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    starts = [line for line in out.stderr.splitlines() if line.startswith("rlhfkit sft: ")]
    assert len(starts) == 1 and f"-> {tmp_path / 'quiet'}" in starts[0] and "precision " in starts[0]
    assert "# resolved" not in out.stderr and "Removed shared tensor" not in out.stderr
    saved = yaml.safe_load((tmp_path / "quiet" / "config.yaml").read_text())["mixed_precision"]
    choice, reason = device.resolve_precision("auto")
    assert saved == choice and f"({reason})" in starts[0]
    manifest = json.loads((tmp_path / "quiet" / "manifest.json").read_text())
    assert manifest["precision"] == {"choice": choice, "reason": reason}
    loud = subprocess.run(argv + ["--name", "loud", "--verbose"], capture_output=True, text=True, timeout=300)
    assert "# resolved SFTConfig" in loud.stderr and "lora_alpha: 32.0" in loud.stderr


def test_a_onednn_isa_limit_below_bf16_means_no_bf16_units():
    """ONEDNN_MAX_CPU_ISA=AVX2 keeps PyTorch's bf16 products off the bf16 units, so the CPU counts as one
    without them: auto gives fp32 and a forced bf16 takes the route through the fp32 kernels."""
    code = ("from rlhfkit.platform.kernels import cpu_has_native_bf16; "
            "from rlhfkit.platform.placement import resolve_precision; "
            "print(cpu_has_native_bf16(), resolve_precision('auto')[0])")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "no"]
