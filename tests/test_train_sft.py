import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, needs_bitsandbytes
from rlhfkit.data.batching import collate
from rlhfkit.data.errors import DataError
from rlhfkit.data.template import encode_examples
from rlhfkit.errors import ConfigError, StoppedError
from rlhfkit.losses import sft_loss
from rlhfkit.models import load_causal_lm
from rlhfkit.train.common import BatchPlan, lr_factor, should_save
from rlhfkit.train.sft import SFTConfig, n_supervised
from rlhfkit.train.sft import run as train

TINY = dict(model="tiny", lr=3e-3, warmup_ratio=0.0, progress=False, max_length=64)


def cfg(tmp_path, train_file, **kw) -> SFTConfig:
    return SFTConfig(train=str(train_file), output_dir=str(tmp_path / "runs"), **{**TINY, **kw})


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _encoded(tokenizer, n=4):
    pairs = [([{"role": "user", "content": f"Count to {i + 1}."}], " ".join(map(str, range(1, 2 + 3 * i))), "x")
             for i in range(n)]
    return encode_examples(tokenizer, pairs, 128, "drop")[0]


def test_batch_equals_accumulation_loss_and_gradients(tokenizer):
    """Batch 4 in one forward pass equals 4 micro-batches of 1 accumulated, for the loss and for
    every gradient, with responses of different lengths (reference §8 item 9)."""
    model, _ = load_causal_lm("tiny", seed=0)
    examples = _encoded(tokenizer)
    n = n_supervised(examples)
    assert len({len(e.response_ids) for e in examples}) == 4

    def run(micro):
        model.zero_grad()
        total = 0.0
        for mb in micro:
            batch = collate(mb, tokenizer.pad_token_id, packing=False)
            labels = batch.pop("labels")
            loss = sft_loss(model(**batch).logits, labels, n)
            loss.backward()
            total += loss.item()
        return total, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss_b4, grads_b4 = run([examples])
    loss_acc, grads_acc = run([[e] for e in examples])
    assert abs(loss_b4 - loss_acc) < 1e-6
    for k in grads_b4:
        torch.testing.assert_close(grads_b4[k], grads_acc[k], rtol=1e-4, atol=1e-7, msg=k)
    # the per-micro-batch mean (the bug) differs: it weights short responses more
    model.zero_grad()
    wrong = sum(sft_loss(model(**{k: v for k, v in collate([e], 0, False).items() if k != "labels"}).logits,
                         collate([e], 0, False)["labels"], n_supervised([e])).item() / 4 for e in examples)
    assert abs(wrong - loss_b4) > 1e-3


def test_packing_equals_padding(tokenizer):
    model, _ = load_causal_lm("tiny", seed=0)
    examples = _encoded(tokenizer)
    out = []
    for packing in (False, True):
        batch = collate(examples, tokenizer.pad_token_id, packing)
        labels = batch.pop("labels")
        out.append(sft_loss(model(**batch, use_cache=False).logits, labels, n_supervised(examples)).item())
    assert out[1] == pytest.approx(out[0], abs=1e-5)


def test_batch_plan_covers_every_example_and_splits_processes():
    plan = BatchPlan(n=10, batch_size=4, micro_batch_size=1, world=2, rank=1, seed=0)
    assert plan.accum == 2 and plan.steps_per_epoch == 3
    seen = [i for s in range(3) for i in plan.step_indices(s)]
    assert set(seen) == set(range(10))  # the last batch wraps around instead of dropping examples
    assert plan.micro_batches(0) == [[plan.step_indices(0)[2]], [plan.step_indices(0)[3]]]
    with pytest.raises(ValueError, match="multiple"):
        BatchPlan(n=10, batch_size=6, micro_batch_size=4)
    # cut by a token budget, a batch need not be a multiple of --micro-batch-size (4 groups, default 8)
    tokens = BatchPlan(n=10, batch_size=4, micro_batch_size=8, lengths=[5] * 10, token_budget=10)
    assert [len(mb) for mb in tokens.micro_batches(0)] == [2, 2]


def test_lr_schedule_warmup_then_cosine_to_min():
    assert [round(lr_factor(s, 10, 2), 4) for s in (0, 1, 2)] == [0.3333, 0.6667, 1.0]
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)


def test_sft_run_directory_is_complete(tmp_path, demos):
    from transformers import AutoModelForCausalLM

    run = train(cfg(tmp_path, demos, name="r", batch_size=8, micro_batch_size=4, max_steps=4, save_every=2,
                    eval_size=8))
    p = run.path
    assert {x.name for x in p.iterdir()} >= {"config.yaml", "manifest.json", "metrics.jsonl", "checkpoints", "final"}
    manifest = json.loads((p / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["stage"] == "sft"
    assert len(manifest["inputs"]["train"]["sha256"]) == 64 and "torch" in manifest["versions"]
    assert manifest["summary"]["eval_loss"] > 0
    assert (p / "checkpoints" / "latest").read_text() == "step-00000004"
    ckpt = p / "checkpoints" / "step-00000004"
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"} <= {x.name for x in ckpt.iterdir()}
    assert not list((p / "checkpoints").glob(".tmp*"))
    rows = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["loss"] < rows[1]["loss"]
    assert rows[0]["eval_loss"] > manifest["summary"]["eval_loss"]  # evaluated before and after training
    reloaded = AutoModelForCausalLM.from_pretrained(str(p / "final"))
    assert reloaded.config.pad_token_id != reloaded.config.eos_token_id


def test_rerun_after_a_failure_at_load_reuses_the_empty_run_directory(tmp_path, demos):
    """A run that fails before its first step (here: a data file with a bad record) leaves only its
    config and manifest, so the same command with the data fixed runs; a directory holding logged
    steps is still refused."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(demos).read_text().splitlines()[0] + "\n{\"prompt\": 3}\n")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        train(cfg(tmp_path, bad, name="r", max_steps=1))
    assert {x.name for x in (tmp_path / "runs" / "r").iterdir()} == {"config.yaml", "manifest.json"}
    run = train(cfg(tmp_path, demos, name="r", batch_size=4, micro_batch_size=4, max_steps=1))
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "finished"
    saved = (run.path / "config.yaml").read_text()
    assert str(demos) in saved and "bad.jsonl" not in saved
    with pytest.raises(ConfigError, match="already exists"):
        train(cfg(tmp_path, demos, name="r", batch_size=4, micro_batch_size=4, max_steps=1))


def test_batch_equals_accumulation_through_the_loop(tmp_path, demos):
    a = train(cfg(tmp_path, demos, name="a", batch_size=4, micro_batch_size=4, max_steps=3))
    b = train(cfg(tmp_path, demos, name="b", batch_size=4, micro_batch_size=1, max_steps=3))
    assert losses(a.path) == pytest.approx(losses(b.path), abs=1e-5)
    assert_same_weights(final_weights(a.path), final_weights(b.path), atol=1e-5)


def test_lora_bf16_and_checkpointing_run(tmp_path, demos):
    from transformers import AutoModelForCausalLM

    run = train(cfg(tmp_path, demos, name="lora", batch_size=4, micro_batch_size=2, max_steps=2, lora_r=4,
                    mixed_precision="bf16", gradient_checkpointing=True))
    merged = AutoModelForCausalLM.from_pretrained(str(run.path / "final"))
    base, _ = load_causal_lm("tiny", seed=0)
    names = [k for k in base.state_dict() if "q_proj" in k]
    assert names and not torch.equal(merged.state_dict()[names[0]], base.state_dict()[names[0]])
    assert all(v == v for v in losses(run.path))


def test_gradient_checkpointing_gives_the_same_loss(tmp_path, demos):
    a = train(cfg(tmp_path, demos, name="gc0", batch_size=4, micro_batch_size=4, max_steps=2))
    b = train(cfg(tmp_path, demos, name="gc1", batch_size=4, micro_batch_size=4, max_steps=2, gradient_checkpointing=True))
    assert losses(a.path) == pytest.approx(losses(b.path), abs=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demos, monkeypatch):
    """A loss that turns NaN at step 3 stops the run before that step is taken or saved; the
    checkpoint of step 2 stays intact and is recorded in the manifest."""
    import rlhfkit.train.sft as sft

    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = sft_loss(*args)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    c = cfg(tmp_path, demos, name="nan", batch_size=4, micro_batch_size=4, max_steps=5, save_every=1)
    with pytest.raises(StoppedError, match="stopped: non-finite loss=nan at step 3"):
        train(c)
    run_dir = tmp_path / "runs" / "nan"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "non-finite" in manifest["error"]
    last = Path(manifest["last_good_checkpoint"])
    assert last.name == "step-00000002" and json.loads((last / "trainer_state.json").read_text())["step"] == 2
    assert all(torch.isfinite(w).all() for w in load_file(str(last / "model.safetensors")).values())
    assert not (run_dir / "final").exists() and len(losses(run_dir)) == 2


def test_config_yaml_defaults_and_flag_override(tmp_path):
    from rlhfkit.config import parse

    (tmp_path / "c.yaml").write_text("lr: 0.5\nbatch_size: 16\nmodel: tiny\n")
    c = parse(SFTConfig, ["--config", str(tmp_path / "c.yaml"), "--lr", "0.25"], prog="x")
    assert (c.lr, c.batch_size, c.model) == (0.25, 16, "tiny")
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.5\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown field"):
        parse(SFTConfig, ["--config", str(tmp_path / "bad.yaml")], prog="x")


def _cli(*args, env=None, **kw):
    return subprocess.Popen([PYTHON, "-m", "rlhfkit.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, demos):
    common = ["sft", "--model", "tiny", "--train", str(demos), "--output-dir", str(tmp_path / "runs"),
              "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "24", "--save-every", "4",
              "--lr", "3e-3", "--no-progress", "--max-length", "64"]
    full = _cli(*common, "--name", "full")
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed = _cli(*common, "--name", "killed")
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step-00000008").is_dir():
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "runs" / "killed" / "final").exists()
    resumed = _cli(*common, "--name", "killed", "--resume")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed" in out
    a, b = tmp_path / "runs" / "full", tmp_path / "runs" / "killed"
    assert [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()] == list(range(1, 25))
    assert losses(b) == pytest.approx(losses(a), abs=1e-6)
    assert_same_weights(final_weights(a), final_weights(b), atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path, demos):
    """accelerate launch --cpu --num_processes 2 (gloo) gives the loss curve of one process with
    accumulation 2 at the same global batch."""
    common = ["sft", "--model", "tiny", "--train", str(demos), "--output-dir", str(tmp_path / "runs"),
              "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5", "--lr", "3e-3",
              "--no-progress", "--max-length", "64", "--save-every", "5"]
    one = _cli(*common, "--name", "one")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    accelerate = str(Path(PYTHON).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                          "-m", "rlhfkit.cli", *common, "--name", "two"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert len(losses(b)) == 5
    assert losses(b) == pytest.approx(losses(a), abs=1e-5)
    assert_same_weights(final_weights(a), final_weights(b), atol=1e-5)


@pytest.mark.parametrize("storage", ["bf16", pytest.param("4bit", marks=needs_bitsandbytes)])
def test_replaced_weights_let_the_loaded_file_go(storage):
    """from_pretrained maps the bundled model's safetensors file. Under bf16 storage the frozen linears
    become bf16 copies (under --load-in-4bit, 4-bit ones), and the weights left in fp32 (embeddings,
    norms) are copied out too, so the mapping and the 0.5 GB of file pages it kept resident go: none of
    the model's weights read the file, and the process's resident file pages fall by more than 0.4 GB.
    Run in a fresh process: a model loaded elsewhere in this one would keep the mapping."""
    script = f"""
import gc, json
from rlhfkit.models import load_causal_lm
from rlhfkit.models.loading import mapped_files
from rlhfkit.train.common import prepare_model, quantization
from rlhfkit.train.sft import SFTConfig

def file_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile")) / 1024

cfg = SFTConfig(lora_r=8, **({{"mixed_precision": "bf16"}} if "{storage}" == "bf16" else {{"load_in_4bit": True}}))
model = load_causal_lm("smollm2-135m-instruct", quantization=quantization(cfg))[0]
for p in model.parameters():
    p.data.sum()  # every page read, as training reads them
read, before = file_mb(), len(mapped_files())
model = prepare_model(model, cfg)
gc.collect()
in_file = [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in mapped_files())]
print(json.dumps({{"read": read, "after": file_mb(), "mapped_before": before, "in_file": in_file}}))
"""
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mapped_before"] >= 1 and result["in_file"] == []
    assert result["read"] - result["after"] > 400, result


def test_save_every_zero_saves_only_at_the_end():
    every = lambda n: type("Args", (), {"save_every": n})  # noqa: E731
    assert [s for s in range(1, 8) if should_save(every(3), s, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if should_save(every(0), s, 7)] == [7]
