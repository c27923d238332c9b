"""QLoRA (--load-in-4bit): a 4-bit NF4 base through bitsandbytes' CPU backend with a LoRA adapter on top,
for every training stage. The saved final/ computes what the trained 4-bit model computes; the reference
is the 4-bit base with the adapter off; bitsandbytes is imported without its hub fetch."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, needs_bitsandbytes, write_jsonl

pytestmark = needs_bitsandbytes


def lora_model(kind: str):
    """A tiny 4-bit model with a LoRA adapter whose B matrices (and reward head) are random, so the
    adapter changes the output."""
    from rlhfkit.config import ModelArgs
    from rlhfkit.models import load_causal_lm
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.train.common import prepare_model, quantization

    cfg = ModelArgs(model="tiny", lora_r=4, load_in_4bit=True)
    if kind == "policy":
        model = prepare_model(load_causal_lm("tiny", quantization=quantization(cfg))[0], cfg)
    else:
        model = prepare_model(load_reward_model("tiny", quantization=quantization(cfg))[0].hf, cfg,
                              modules_to_save=["score"])
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name or "score" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_saved_model_computes_what_the_4bit_model_computes(kind):
    """merged_fp32 (what final/ holds): each adapted layer de-quantised with the adapter merged, in fp32,
    with no 4-bit weight and no quantisation config left, gives the 4-bit model's outputs (fp32 products:
    to rounding). The adapter moves them far more than that, so a lost adapter or a re-quantised merge
    (peft's own merge on a 4-bit layer) fails."""
    from rlhfkit.models import merged_fp32
    from rlhfkit.models.quant import is_4bit

    model = lora_model(kind)
    assert is_4bit(model)
    head = model.get_submodule("base_model.model.score" if kind == "reward" else "base_model.model.lm_head")
    assert not is_4bit(head)  # the output layer stays in full precision (a reward head is trained)
    ids = torch.tensor([[1, 57, 300, 4021, 9, 77, 12]])
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        plain = merged_fp32(model)
        saved = plain(input_ids=ids).logits
    assert not is_4bit(plain) and not hasattr(plain, "peft_config")
    assert getattr(plain.config, "quantization_config", None) is None
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert (out - base).abs().max() > 0.05
    torch.testing.assert_close(saved, out, rtol=0, atol=1e-4)
    assert is_4bit(model)  # the trained model is left as it was


def test_bitsandbytes_is_imported_without_a_hub_fetch(tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes' CPU backend calls ``kernels.get_kernel`` (a Hugging Face hub
    download) as it is imported. A stand-in ``kernels`` module that records any call shows rlhfkit's import
    makes none, and the real module is in place again afterwards. (On a CPU without AVX512-BF16
    bitsandbytes makes no such call either way.)"""
    (tmp_path / "kernels.py").write_text(
        "import pathlib\n"
        f"def get_kernel(*a, **k):\n    pathlib.Path({str(tmp_path / 'fetched')!r}).write_text(repr(a))\n"
        "    raise RuntimeError('hub')\n")
    code = ("import sys; from rlhfkit.models.quant import import_bitsandbytes; import_bitsandbytes(); "
            "import kernels; print(kernels.__file__)")
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "fetched").exists()
    assert out.stdout.strip() == str(tmp_path / "kernels.py")


def test_what_qlora_needs_is_checked_first(tmp_path):
    """A 4-bit base without an adapter to train, and a 4-bit policy with the vllm engine, stop before
    anything is loaded, with the flag to change."""
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as train
    from rlhfkit.train.sft import SFTConfig
    from rlhfkit.train.sft import run as sft

    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    with pytest.raises(ConfigError, match="set --lora-r"):
        sft(SFTConfig(model="tiny", train=str(demos), load_in_4bit=True, output_dir=str(tmp_path), progress=False))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    (tmp_path / "rule.yaml").write_text("max_words: 5\n")
    with pytest.raises(ConfigError, match="--rollout vllm with --load-in-4bit"):
        train(PGConfig(model="tiny", train=str(prompts), reward=f"rule:{tmp_path / 'rule.yaml'}", lora_r=4,
                       load_in_4bit=True, rollout="vllm", batch_size=2, eval_size=0, samples_per_prompt=2, micro_batch_size=4,
                       output_dir=str(tmp_path), progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "pg", "ppo"])
def test_every_stage_trains_on_a_4bit_base(tmp_path, stage):
    """Each stage on a tiny 4-bit base: it trains (finite, logged losses), the RL stages start with KL 0
    (the reference is the same 4-bit base with the adapter off, and LoRA starts at B = 0), and final/ is a
    plain fp32 Hugging Face folder that transformers loads without bitsandbytes."""
    from rlhfkit.cli import main
    from test_sharded import stage_args, write_stage_data

    args = stage_args(stage, write_stage_data(tmp_path))
    if "--lora-r" not in args:
        args += ["--lora-r", "4"]
    main([*args, "--load-in-4bit", "--output-dir", str(tmp_path / "runs"), "--name", stage])
    run = tmp_path / "runs" / stage
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r[k] for r in rows for k in ("loss", "policy_loss") if k in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if stage in ("pg", "ppo"):
        assert rows[0]["kl"] == 0.0
    config = json.loads((run / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    model = auto.from_pretrained(run / "final")
    assert {type(p) for p in model.parameters()} == {torch.nn.Parameter}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_hf_engine_samples_a_4bit_policy():
    """The hf engine samples a 4-bit policy: bitsandbytes' layers run their own kernels, oneDNN packing
    takes only the module weights it sees (the LoRA matrices, the LM head), its cache stays the same size
    from one call to the next, and the samples are those of the plain kernels."""
    from rlhfkit.rollout.engine import HFEngine, SamplingParams

    model = lora_model("policy")
    engine = HFEngine(model, torch.device("cpu"))
    params = SamplingParams(pad_id=0, eos_id=2, max_new_tokens=6, min_new_tokens=6)
    prompts = [[1, 57, 300], [1, 4021, 9, 77]]
    draw = [engine.generate(prompts, params, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    sizes = len(engine.packed)
    engine.generate(prompts, params, generator=torch.Generator().manual_seed(3))
    assert len(engine.packed) == sizes
    own = {id(p) for p in model.parameters()}
    assert set(engine.packed) <= own
    engine.packed = None
    plain = engine.generate(prompts, params, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw[0].response_ids, draw[1].response_ids)
    assert torch.equal(plain.response_ids, draw[0].response_ids)
    torch.testing.assert_close(plain.logprobs, draw[0].logprobs, rtol=0, atol=2e-4)  # fp32 rounding at |logp| ~ 10


def test_a_4bit_layer_computes_the_same_after_sampling_and_still_passes_gradients():
    """A forward in eval mode (sampling) must not switch the 4-bit layers to another kernel: on a CPU with
    AVX512-BF16, bitsandbytes would repack them for a bf16 kernel without a backward pass. After an eval
    forward, the training forward gives the logits it gave before, to fp32 rounding, and the lowest
    layer's LoRA matrices still get a gradient (it flows back through every 4-bit layer above them)."""
    model = lora_model("policy")
    ids = torch.tensor([[1, 57, 300, 4021, 9, 77, 12]])
    model.train()
    before = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after.detach(), before, rtol=0, atol=1e-4)
    after.float().square().mean().backward()
    lowest = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert lowest and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lowest)
