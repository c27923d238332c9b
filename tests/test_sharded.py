"""Training under the shipped accelerate configs (configs/accelerate/) on CPU processes over gloo: two
processes under FSDP2 and DeepSpeed ZeRO-3 (and ZeRO-2, DDP) equal one process with accumulation 2 for
every training stage, a SIGKILLed FSDP2 or ZeRO-3 run resumes to the uninterrupted result, and the final/
of a sharded run is a plain Hugging Face folder that scores like the one-process model. The DeepSpeed
tests skip where DeepSpeed is not installed; bench/gpu_check.sh runs the configs on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, write_jsonl

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "configs" / "accelerate"
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
PROMPTS = ["How do I read a CSV file?", "What is a good first language?", "How can I sort numbers?",
           "Explain a neural network.", "How do I count words?", "What is regression?", "How do I make a request?",
           "What is overfitting?", "How do I reverse a string?", "What is a dictionary?", "How do I plot?",
           "What is gradient descent?"]


@pytest.fixture()
def data(tmp_path) -> dict:
    return write_stage_data(tmp_path)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """``stage_runs(stage, config)``: the run of :func:`stage_args` for ``stage``, on one process (``config``
    None) or under a launch config, made once for the tests of this module that compare the same runs."""
    folder = tmp_path_factory.mktemp("stage-runs")
    d = write_stage_data(folder)
    made: dict = {}

    def run(stage: str, config: str | None = None) -> Path:
        if (stage, config) not in made:
            made[stage, config] = cli(stage_args(stage, d), folder / "runs", f"{stage}-{config or 'one'}", config=config)
        return made[stage, config]

    return run


def write_stage_data(folder: Path) -> dict:
    """The files :func:`stage_args` reads (demonstrations, pairs, prompts, a rule reward), in ``folder``."""
    demos = [{"prompt": f"Count to {i % 7 + 1}.", "response": " ".join(str(k) for k in range(1, i % 7 + 2))}
             for i in range(40)]
    pairs = [{"prompt": f"Question {i}?", "chosen": f"Thank you for asking, the answer is {i}.",
              "rejected": f"Whatever. {i}."} for i in range(40)]
    (folder / "rule.yaml").write_text("keywords: [the]\nmax_words: 5\n")
    return {"demos": str(write_jsonl(folder / "demos.jsonl", demos)),
            "pairs": str(write_jsonl(folder / "pairs.jsonl", pairs)),
            "prompts": str(write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])),
            "rule": f"rule:{folder / 'rule.yaml'}"}


def stage_args(stage: str, d: dict) -> list[str]:
    """A few steps of ``stage`` on the tiny model. Each step holds 8 sequences (4 prompts x 2 samples
    for pg), cut into micro-batches of 4: accumulation 2 on one process, 1 on each of two."""
    rl = ["--train", d["prompts"], "--reward", d["rule"], "--batch-size", "4", "--max-new-tokens", "6",
          "--lora-r", "4", "--eval-size", "4", "--eval-prompts", "4", "--temperature", "1.0", "--lr", "1e-3"]
    return {
        "sft": ["sft", "--train", d["demos"], "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "4",
                "--lr", "3e-3", "--max-length", "64", "--eval-size", "8"],
        "rm": ["rm", "train", "--train", d["pairs"], "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3",
               "--lr", "1e-3", "--eval-size", "8"],
        "dpo": ["dpo", "--train", d["pairs"], "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3",
                "--lr", "1e-3", "--eval-size", "8"],
        "pg": ["pg", "--estimator", "rloo", "--samples-per-prompt", "2", "--micro-batch-size", "4", "--max-steps", "3",
               *rl],
        "ppo": ["ppo", "--micro-batch-size", "2", "--max-steps", "3", "--ppo-epochs", "1", *rl],
    }[stage] + ["--model", "tiny", "--no-progress", "--save-every", "2"]


def cli(args: list[str], out: Path, name: str, config: str | None = None, wait=True, resume=False,
        printed: list | None = None):
    """One process (``config`` None) or ``accelerate launch --config_file configs/accelerate/<config>.yaml``.
    What the processes print is appended to ``printed`` when given."""
    tail = [*args, "--output-dir", str(out), *(["--name", name] if name else []), *(["--resume"] if resume else [])]
    if config is None:
        cmd = [PYTHON, "-m", "rlhfkit", *tail]
    else:
        cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--main_process_port", "0",
               "-m", "rlhfkit", *tail]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-4000:]
    if printed is not None:
        printed.append(output)
    return out / name if name else out


def skip_without_deepspeed(config: str) -> None:
    """Skip a test under a DeepSpeed config (zero*) where DeepSpeed is not installed."""
    if config.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (make test installs it; pip install --no-build-isolation deepspeed)")


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# what each stage logs from all processes together (the RL stages also log per-process figures)
COMPARED = {"sft": ["loss", "grad_norm", "lr", "eval_loss"], "rm": ["loss", "accuracy", "margin", "grad_norm"],
            "dpo": ["loss", "rewards/margins", "logps/chosen", "grad_norm", "eval_loss"],
            "pg": ["score", "kl", "policy_loss", "grad_norm", "lr"],
            "ppo": ["score", "kl", "policy_loss", "value_loss", "grad_norm", "lr"]}


def assert_same_runs(a: Path, b: Path, keys: list[str], atol: float) -> None:
    ma, mb = logged(a), logged(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    compared = 0
    for x, y in zip(ma, mb, strict=True):
        for k in keys:
            if k in x or k in y:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=atol), (x["step"], k, x[k], y[k])
                compared += 1
    assert compared >= len(ma) * 2
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=k)


def assert_same_heldout(a: Path, b: Path) -> None:
    """The held-out comparison of two RL runs (made on the main process, with the gathered weights) agrees."""
    held = [json.loads((run / "heldout.json").read_text())["rewards"]["reward"] for run in (a, b)]
    assert held[1] == pytest.approx(held[0], abs=1e-4)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "pg", "ppo"])
def test_fsdp2_two_processes_equal_one_process_with_accumulation(stage_runs, stage):
    """Two CPU processes under configs/accelerate/fsdp2.yaml (parameters, gradients and optimiser state
    sharded; the RL stages gather the weights to sample) log the same losses and write the same final
    weights as one process with accumulation 2 (the RL stages draw each response from its own stream,
    so both sample the same responses), within float rounding."""
    one, two = stage_runs(stage), stage_runs(stage, "fsdp2")
    assert_same_runs(one, two, COMPARED[stage], atol=2e-5)
    if stage in ("pg", "ppo"):  # held out on the main process, with the gathered weights
        assert_same_heldout(one, two)
    checkpoint = two / "checkpoints" / "step-00000002"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded


@pytest.mark.parametrize("stage", ["pg", "ppo", "dpo"])
def test_fsdp2_shards_the_frozen_models_and_equals_one_process(tmp_path, data, stage):
    """Without LoRA the reference is a frozen copy of the policy; pg here scores with a reward model.
    Under fsdp2.yaml each is sharded as the policy is: each of the two processes holds half its weights
    and gathers a layer for its forward, and the whole model for the held-out comparison (pg, ppo). The
    run still equals one process, over two steps: every weight moves in full fine-tuning, and at the
    third step's sampling the two runs' rounding differences pick another token from the tiny model's
    near-uniform distribution (the same with nothing but the policy sharded)."""
    from rlhfkit.models.reward import load_reward_model, save_reward_model

    args = [*stage_args(stage, data), "--lora-r", "0", "--max-steps", "2"]
    sharded = ["the reference"]
    if stage == "pg":
        rm, tok = load_reward_model("tiny", seed=3)
        save_reward_model(rm, tok, tmp_path / "rm")
        args += ["--reward", str(tmp_path / "rm")]
        sharded.append("reward model rm:rm")
    one = cli(args, tmp_path / "runs", "one")
    printed: list[str] = []
    two = cli(args, tmp_path / "runs", "fsdp2", config="fsdp2", printed=printed)
    for name in sharded:
        assert f"{name} sharded over 2 processes: 50.0% of its weights on this process" in printed[0], printed[0][-3000:]
    assert_same_runs(one, two, COMPARED[stage], atol=2e-5)
    if stage != "dpo":
        assert_same_heldout(one, two)


def test_fsdp2_in_bf16_trains_as_one_process_does(tmp_path, data):
    """--mixed-precision bf16 under fsdp2.yaml (FSDP2's MixedPrecisionPolicy: bf16 weights in the passes,
    fp32 master weights) against one process under bf16 autocast, full fine-tuning: the same losses and
    gradient norms within bf16 rounding, and final weights (fp32) that differ by under 2% of how far
    training moved them (0.3% on one machine)."""
    from rlhfkit.models import load_causal_lm

    args = [*stage_args("sft", data), "--mixed-precision", "bf16"]
    one = cli(args, tmp_path / "runs", "one")
    two = cli(args, tmp_path / "runs", "fsdp2", config="fsdp2")
    for x, y in zip(logged(one), logged(two), strict=True):
        for k in ("loss", "grad_norm", "eval_loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-2), (x["step"], k)
    start = load_causal_lm("tiny")[0].state_dict()
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert {w.dtype for w in wb.values()} == {torch.float32}
    moved = sum((wa[k] - start[k]).abs().sum() for k in wa)
    apart = sum((wb[k] - wa[k]).abs().sum() for k in wa)
    assert moved > 0 and apart < 0.02 * moved, (apart / moved).item()


def test_ddp_config_equals_one_process(stage_runs):
    """configs/accelerate/ddp.yaml (a GPU config) on a machine without a GPU: the two processes form one
    gloo group and equal one process with accumulation 2, learning-rate schedule included (accelerate's
    scheduler wrapper stepped it once per process per step: the schedule ran twice as fast)."""
    one, two = stage_runs("sft"), stage_runs("sft", "ddp")
    lrs = [[m["lr"] for m in logged(run) if "lr" in m] for run in (one, two)]
    assert len(lrs[0]) == 4 and lrs[1] == pytest.approx(lrs[0], abs=1e-12)
    assert_same_runs(one, two, COMPARED["sft"], atol=2e-5)


def test_bon_two_processes_write_what_one_process_writes(tmp_path, data):
    """bon under a two-process launch deals the prompt batches out and merges the parts in prompt order:
    samples.jsonl, best.jsonl and pairs.jsonl equal the one-process run's. Launched without --name, the
    processes agree on one run directory."""
    args = ["bon", "--train", data["prompts"], "--reward", data["rule"], "--n", "3", "--batch-size", "2",
            "--max-new-tokens", "6", "--model", "tiny", "--no-progress"]
    one = cli(args, tmp_path / "runs", "one")
    cli(args, tmp_path / "runs" / "launched", None, config="ddp")  # no --name: the main process's clock names it
    [two] = list((tmp_path / "runs" / "launched").iterdir())
    for name in ("samples", "best", "pairs"):
        assert (two / f"{name}.jsonl").read_text() == (one / f"{name}.jsonl").read_text(), name
    assert (one / "samples.jsonl").read_text().count("\n") == 3 * len(PROMPTS)
    assert json.loads((two / "manifest.json").read_text())["summary"] == json.loads((one / "manifest.json").read_text())["summary"]
    assert not list(two.glob(".bon-part-*"))


def test_deepspeed_accumulates_as_the_stage_says(tmp_path, data):
    """zero3.yaml says accumulation 1, as every launch config does; a step of 16 in micro-batches of 4
    on two processes accumulates 2 on each, and equals one process accumulating 4 (accelerate would
    take DeepSpeed's 1, and every micro-batch would be an optimiser step)."""
    skip_without_deepspeed("zero3")
    args = stage_args("sft", data)
    args[args.index("--batch-size") + 1], args[args.index("--max-steps") + 1] = "16", "2"
    one = cli(args, tmp_path / "runs", "one")
    two = cli(args, tmp_path / "runs", "zero3", config="zero3")
    assert_same_runs(one, two, COMPARED["sft"], atol=5e-5)


@pytest.mark.parametrize("config,stage,flags,message", [
    ("fsdp2", "rm", ["--micro-batch-tokens", "256"], "--micro-batch-tokens under FSDP"),
    ("fsdp2", "pg", ["--rollout", "vllm"], "--rollout vllm under FSDP"),
    ("fsdp2", "dpo", ["--load-in-4bit", "--lora-r", "4"], "--load-in-4bit under FSDP"),
    ("zero3", "rm", ["--micro-batch-tokens", "256"], "--micro-batch-tokens under DeepSpeed"),
    ("zero3", "pg", ["--rollout", "vllm"], "--rollout vllm under DeepSpeed ZeRO-3"),
    ("zero3", "dpo", ["--load-in-4bit", "--lora-r", "4"], "--load-in-4bit under DeepSpeed")])
def test_what_sharding_cannot_do_is_refused_with_the_reason(tmp_path, data, config, stage, flags, message):
    """Under fsdp2.yaml and zero3.yaml, token-budget micro-batches (a different number of passes per
    process; DeepSpeed steps after a fixed number), the vllm engine (its weight sync reads whole tensors)
    and a 4-bit base (bitsandbytes' weights are not sharded here) stop with a ConfigError naming the flag."""
    skip_without_deepspeed(config)
    proc = cli([*stage_args(stage, data), *flags], tmp_path / "runs", "refused", config=config, wait=False)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and message in out, out[-3000:]


@pytest.mark.parametrize("config", ["fsdp2", "zero3"])
def test_sharded_sigkill_then_resume_equals_uninterrupted(tmp_path, data, config):
    """An FSDP2 or ZeRO-3 run killed with SIGKILL after its step-4 checkpoint (sharded model and optimiser
    state) and resumed with --resume ends exactly where the uninterrupted run does."""
    skip_without_deepspeed(config)
    args = stage_args("sft", data)
    args[args.index("--max-steps") + 1] = "8"  # checkpoints every 2 steps
    full = cli(args, tmp_path / "runs", "full", config=config)
    killed = cli(args, tmp_path / "runs", "killed", config=config, wait=False)
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-00000004" / "trainer_state.json").is_file():
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    _kill_tree(killed.pid)
    killed.wait()
    assert not (tmp_path / "runs" / "killed" / "final").exists()
    resumed = cli(args, tmp_path / "runs", "killed", config=config, resume=True)
    assert [m["step"] for m in logged(resumed) if "loss" in m] == list(range(1, 9))
    assert_same_runs(full, resumed, COMPARED["sft"], atol=1e-6)


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every training process under it (psutil comes with accelerate)."""
    import psutil

    for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
        proc.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("stage", ["rm", "pg"])
def test_fsdp2_final_loads_with_transformers_and_scores_as_one_process(stage_runs, stage):
    """The final/ of an FSDP2 run is a full Hugging Face folder (gathered, LoRA merged for pg) that
    transformers loads; it gives the logits (pg: a causal LM) or scores (rm: a sequence classifier) of the
    one-process run's final model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    one, two = stage_runs(stage), stage_runs(stage, "fsdp2")
    cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(two / "final")
    batch = tok(["Question 3? Thank you for asking, the answer is 3.", "How do I plot? Use matplotlib."],
                return_tensors="pt", padding=True)
    outs = []
    for run in (one, two):
        model = cls.from_pretrained(run / "final").eval()
        assert not any(hasattr(m, "lora_A") for m in model.modules())
        with torch.no_grad():
            outs.append(model(**batch).logits)
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3-offload", "fsdp2-offload"])
def test_deepspeed_and_offload_configs_are_what_accelerate_reads(config):
    """The DeepSpeed configs and FSDP2's offload config (for GPUs: it pins host memory for a GPU) parse
    into accelerate's launch settings with the strategy they name, also where DeepSpeed is not installed.
    The tests above train under the three DeepSpeed configs on CPU processes; bench/gpu_check.sh under zero3
    on a GPU."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{config}.yaml"))
    if config.startswith("zero"):
        assert cfg.distributed_type == "DEEPSPEED"
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(config[4])
        assert (ds.get("offload_param_device") == "cpu") == config.endswith("offload")
        if ds["zero_stage"] == 3:
            assert ds["zero3_save_16bit_model"] is True  # final/ gathered into one Hugging Face folder
    else:
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_offload_params"] is True


@pytest.mark.parametrize(("config", "stage"), [("zero2", "sft"), ("zero3-offload", "sft"),
                                               *(("zero3", s) for s in ["sft", "rm", "dpo", "pg", "ppo"])])
def test_deepspeed_two_processes_equal_one_process_with_accumulation(stage_runs, config, stage):
    """Two CPU processes under DeepSpeed ZeRO (configs/accelerate/zero2.yaml, zero3.yaml, and
    zero3-offload.yaml, whose optimiser is DeepSpeed's CPU Adam, compiled at its first use; gloo, as
    DeepSpeed's CPU accelerator runs without oneCCL) log the same losses and write the same final
    weights as one process with accumulation 2. ZeRO-3 partitions the parameters: final/ is gathered
    from the partitions, and every process starts from the main process's random parts (LoRA's A,
    new heads)."""
    skip_without_deepspeed(config)
    one, two = stage_runs(stage), stage_runs(stage, config)
    assert_same_runs(one, two, COMPARED[stage], atol=5e-5)  # DeepSpeed sums gradients in its own order
    if stage in ("pg", "ppo"):  # held out on the main process alone, with the gathered weights
        assert_same_heldout(one, two)
    checkpoint = two / "checkpoints" / "step-00000002"
    assert (checkpoint / "pytorch_model").is_dir()  # DeepSpeed's own sharded checkpoint
