"""Every config in configs/ and the README's commands run, through the command line, on the bundled
model under the dtype each config sets (on a CPU without bf16 units, bf16 goes through the fp32 kernels:
rlhfkit.platform.kernels.bf16_products_through_fp32), cut to one optimiser step of a small batch and a few records. A shipped command
that breaks (as `rlhfkit ppo --config configs/ppo-rule.yaml` did when the reward head's dtype changed)
fails here, not in a user's hands."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, SHARED_DATA
from rlhfkit.platform.placement import resolve_precision

pytestmark = pytest.mark.slow

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))

# flags that cut a config down to one step of a small batch and a few records, by the stage it runs (the
# config's other settings, micro-batching and accumulation included, stay as shipped)
CUT = {
    "rm train": ["--max-steps", "1", "--limit", "16", "--eval-size", "4", "--ood-fit", "0", "--batch-size", "4"],
    "dpo": ["--max-steps", "1", "--limit", "16", "--eval-size", "4", "--batch-size", "4"],
    "sft": ["--max-steps", "1"],
    "ppo": ["--max-steps", "1", "--eval-prompts", "2", "--max-new-tokens", "8", "--batch-size", "8"],
    "pg": ["--max-steps", "1", "--eval-prompts", "2", "--max-new-tokens", "8"],
}


def stage_of(path: Path) -> str:
    """The command a shipped config is for, from the line in its header that runs it
    (``#   rlhfkit <stage> --config configs/<name>``)."""
    found = re.search(rf"rlhfkit ([a-z]+(?: [a-z]+)?) --config configs/{re.escape(path.name)}", path.read_text())
    assert found, f"{path}: its header must show the command that runs it"
    return found.group(1)


def cli(*args, cwd: Path, timeout: int = 900):
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"rlhfkit {' '.join(args)}\n{out.stderr[-3000:]}"
    return out


def needs_shared(config: dict) -> None:
    for value in config.values():
        if isinstance(value, str) and "../shared/data" in value and not SHARED_DATA.exists():
            pytest.skip(f"third-party test data {SHARED_DATA} is absent (expected ../shared/data beside the repo)")


def small_pipeline(config: dict, out: Path) -> Path:
    """The quickstart's sections cut down: 8 prompts sampled, one RM step, one RL step, 2 held-out prompts."""
    config = json.loads(json.dumps(config))
    config["feedback"].update(limit=8, max_new_tokens=8)
    config["reward_model"].update(max_steps=1, eval_size=4, ood_fit=0)
    config["rl"].update(max_steps=1, max_new_tokens=8)
    config.setdefault("evaluate", {}).update(eval_prompts=2)
    config["output_dir"] = str(out)
    path = out / "pipeline.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_runs_one_step(name, tmp_path):
    path = ROOT / "configs" / name
    config = yaml.safe_load(path.read_text())
    needs_shared(config)
    stage = stage_of(path)
    if stage == "pipeline":
        cli("pipeline", "--config", str(small_pipeline(config, tmp_path / "runs")), cwd=ROOT)
        manifest = json.loads((tmp_path / "runs" / config["name"] / "manifest.json").read_text())
        assert manifest["status"] == "finished"
        return
    cli(*stage.split(), "--config", str(path), *CUT[stage], "--output-dir", str(tmp_path / "runs"), "--name", "smoke",
        "--no-progress", cwd=ROOT)
    run = tmp_path / "runs" / "smoke"
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # under the precision the config sets, resolved for this machine ('auto': by the hardware) and saved resolved
    assert saved["mixed_precision"] == resolve_precision(config.get("mixed_precision", "no"))[0]
    assert (run / "final" / "config.json").is_file()


def test_readme_commands_run(tmp_path):
    """The README's example commands that need no earlier run, cut to a few records; bon reads a reward
    model trained here for one step, as the README's runs/hh-rm/final."""
    out = ["--output-dir", str(tmp_path / "runs"), "--no-progress"]
    cli("sft", "--train", "examples/demonstrations.jsonl", "--eval-size", "8", "--lora-r", "8", "--lr", "3e-4",
        "--epochs", "2", "--max-steps", "1", "--name", "sft", *out, cwd=ROOT)
    cli("sft", "--name", "sft", "--resume", "--train", "examples/demonstrations.jsonl", "--eval-size", "8", "--lora-r",
        "8", "--lr", "3e-4", "--epochs", "2", "--max-steps", "1", *out, cwd=ROOT)
    cli("judge", "--data", "examples/judge-pairs.jsonl", "--name", "judge", "--limit", "2", "--max-new-tokens", "8",
        "--output-dir", str(tmp_path / "runs"), cwd=ROOT)
    cli("label", "--train", "examples/prompts.jsonl", "--k", "2", "--labeler", "judge", "--limit", "2",
        "--max-new-tokens", "8", "--judge-max-new-tokens", "8", "--name", "label", *out, cwd=ROOT)
    prefs = tmp_path / "runs" / "label" / "preferences.jsonl"
    rm_data = prefs if prefs.read_text().strip() else ROOT / "examples" / "judge-pairs.jsonl"
    cli("rm", "train", "--train", str(rm_data), "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
        "--trainable-layers", "2", "--ood-fit", "0", "--name", "hh-rm", *out, cwd=ROOT)
    cli("bon", "--train", "examples/prompts.jsonl", "--reward", str(tmp_path / "runs" / "hh-rm" / "final"), "--n", "4",
        "--limit", "2", "--max-new-tokens", "8", "--name", "bon", *out, cwd=ROOT)
    assert (tmp_path / "runs" / "bon" / "best.jsonl").read_text().count("\n") == 2
    if SHARED_DATA.exists():
        cli("data", "inspect", str(SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), cwd=ROOT)
