"""`rlhfkit export`: a LoRA policy of the bundled model to a merged Hugging Face folder and to GGUF
(f16, bf16, Q8_0), each loaded back with transformers and compared with the unmerged model's logits."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow
PROMPT = [{"role": "user", "content": "Name three colours and say why the sky is blue."}]


@pytest.fixture(scope="module")
def lora_policy(tmp_path_factory):
    """The bundled model with a LoRA adapter whose B matrices are random (so merging changes the
    weights), saved as peft saves an adapter; and its unmerged logits on one prompt."""
    from rlhfkit.data.template import encode_prompt
    from rlhfkit.models import apply_lora, load_causal_lm

    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model, tok = load_causal_lm("smollm2-135m-instruct")
    torch.manual_seed(0)
    model = apply_lora(model, 8, 16.0, 0.0, "all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ids = torch.tensor([encode_prompt(tok, PROMPT)])
    with torch.no_grad():
        logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    assert (logits - base_logits).abs().max() > 0.5  # the adapter changes the model
    return folder, ids, logits


def export(*args):
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "export", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_export_hf_merges_lora(lora_policy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ids, logits = lora_policy
    export(str(folder), "--to", "hf", "--output", str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and not (tmp_path / "hf" / "adapter_config.json").exists()
    with torch.no_grad():
        diff = (model(ids).logits - logits).abs().max().item()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("kind, max_tol, mean_tol, agree", [("f16", 0.25, 0.02, 0.99), ("bf16", 2.0, 0.2, 0.9),
                                                            ("q8_0", 3.0, 0.4, 0.85)])
def test_export_gguf_reloads_with_transformers(lora_policy, tmp_path, kind, max_tol, mean_tol, agree):
    """Tolerances on the logits (std about 8): f16 rounds each weight to 11 significant bits, bf16 to 8; Q8_0
    stores blocks of 32 weights as int8 with one scale each, so its logits move more (the bundled
    weights were themselves de-quantised from Q4_1/Q8_0, which Q8_0 does not reproduce exactly)."""
    from transformers import AutoModelForCausalLM

    folder, ids, logits = lora_policy
    path = tmp_path / f"policy-{kind}.gguf"
    printed = export(str(folder), "--to", "gguf", "--gguf-type", kind, "--output", str(path))
    assert f"wrote {path}" in printed
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    diff = (got - logits).abs()
    same = (got.argmax(-1) == logits.argmax(-1)).float().mean().item()
    print(f"\n{kind}: {path.stat().st_size / 1e6:.1f} MB, logits max |diff| {diff.max():.4f}, mean {diff.mean():.4f}, "
          f"argmax agreement {same:.3f}")
    assert diff.max() < max_tol and diff.mean() < mean_tol and same >= agree


def test_a_reward_model_is_copied_not_converted(tmp_path):
    from rlhfkit.models.reward import load_reward_model, save_reward_model

    rm, tok = load_reward_model("tiny")
    save_reward_model(rm, tok, tmp_path / "rm")
    printed = export(str(tmp_path / "rm"), "--to", "hf", "--output", str(tmp_path / "copy"))
    assert "is a reward model" in printed
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["architectures"][0].endswith(
        "ForSequenceClassification")
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "export", str(tmp_path / "rm"), "--to", "gguf"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "stays in the Hugging Face" in out.stderr and "Traceback" not in out.stderr
