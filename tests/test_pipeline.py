"""The pipeline on the tiny model: stages, manifest, report, and interrupt-then-resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, write_jsonl

PROMPTS = [f"Question {i}: how do I {verb} a {noun}?" for i, (verb, noun) in enumerate(
    [(v, n) for v in ("sort", "copy", "print", "read", "merge") for n in ("list", "file", "string", "table", "dict")])]


def pipeline_config(tmp_path, out: str, **over) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    utility = tmp_path / "utility.yaml"
    utility.write_text("min_words: 2\nmax_words: 6\nname: gold\n")
    cfg = {
        "name": "pipe", "output_dir": str(tmp_path / out), "model": "tiny", "prompts": str(prompts), "eval_size": 5,
        "progress": False, "algorithm": "pg",
        "feedback": {"labeler": "simulated", "utility": f"rule:{utility}", "noise": 0.2, "k": 3, "limit": 12,
                     "max_new_tokens": 8, "batch_size": 6},
        "reward_model": {"eval_size": 6, "batch_size": 6, "micro_batch_size": 6, "lr": 1e-3, "max_length": 64,
                         "ood_fit": 40, "trainable_layers": 1, "mixed_precision": "bf16"},
        "rl": {"estimator": "rloo", "samples_per_prompt": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
               "max_new_tokens": 8, "max_length": 64, "max_steps": 14, "save_every": 1, "keep_checkpoints": 20},
        "evaluate": {"eval_prompts": 5},
    }
    cfg.update(over)
    return cfg


def write_config(tmp_path, cfg: dict):
    path = tmp_path / f"{cfg['output_dir'].rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_in_process(path):
    from rlhfkit.cli import main

    main(["pipeline", "--config", str(path)])


def metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time_")} for r in rows]


def test_simulated_annotator_follows_bradley_terry():
    """P(a preferred) = sigmoid((u_a - u_b) / noise): with u_a - u_b = 0.1 and noise 0.1 that is
    sigmoid(1) = 0.7311; with noise 1e-6 the better answer always wins; equal utilities are a coin flip."""
    from rlhfkit.feedback.label import simulated_choice

    rng = random.Random(0)
    n = 20000
    share = sum(simulated_choice(0.6, 0.5, 0.1, rng) for _ in range(n)) / n
    assert share == pytest.approx(0.7311, abs=0.01)
    assert all(simulated_choice(0.6, 0.5, 1e-6, rng) for _ in range(200))
    assert sum(simulated_choice(0.5, 0.5, 0.1, rng) for _ in range(n)) / n == pytest.approx(0.5, abs=0.015)


def test_pipeline_interrupted_in_rl_resumes_to_the_same_result(tmp_path):
    """Run the pipeline in a subprocess and kill it (SIGKILL) once the RL stage has written a checkpoint.
    Running the same command again skips the finished feedback and reward-model stages (their manifests
    are untouched), resumes RL from its checkpoint, and ends with the same RL metrics and the same
    held-out evaluation as an uninterrupted run (the monitors' history is restored too, so their alarms
    match)."""
    full_cfg = write_config(tmp_path, pipeline_config(tmp_path, "full"))
    run_in_process(full_cfg)
    full = tmp_path / "full" / "pipe"

    cut_cfg = write_config(tmp_path, pipeline_config(tmp_path, "cut"))
    cut = tmp_path / "cut" / "pipe"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(cut_cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = cut / "r1-pg" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(ckpts.glob("step-*"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the pipeline ended before it could be interrupted: {proc.stderr.read()}"
    rl_manifest = json.loads((cut / "r1-pg" / "manifest.json").read_text())
    assert rl_manifest["status"] == "running"
    done_before = {s: (cut / s / "manifest.json").read_text() for s in ("r1-feedback", "r1-rm")}
    assert not (cut / "r1-eval").exists()

    run_in_process(cut_cfg)  # the same command again
    for s, text in done_before.items():
        assert (cut / s / "manifest.json").read_text() == text, f"{s} ran again"
    a, b = metrics(full / "r1-pg" / "metrics.jsonl"), metrics(cut / "r1-pg" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    for x, y in zip(a, b):
        for key in ("score", "kl", "gold", "policy_loss", "response_length", "monitor/length_corr", "monitor/alarms"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)
    ea, eb = (json.loads((d / "r1-eval" / "eval.json").read_text()) for d in (full, cut))
    for name in ("reward", "gold"):
        assert ea["rewards"][name]["policy"] == pytest.approx(eb["rewards"][name]["policy"], abs=1e-5)
    assert ea["kl"] == pytest.approx(eb["kl"], abs=1e-5)

    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [s["name"] for s in manifest["stages"]] == ["r1-feedback", "r1-rm", "r1-pg", "r1-eval"]
    html = (cut / "report.html").read_text()
    assert "r1-rm" in html and "Held-out evaluation" in html and "<script>alert" not in html
    for stage in ("r1-feedback", "r1-rm", "r1-pg", "r1-eval"):
        assert json.loads((cut / stage / "manifest.json").read_text())["status"] == "finished"
    assert (cut / "r1-rm" / "final" / "ood.pt").is_file()
    assert (cut / "r1-rm" / "eval" / "reliability.png").is_file()
    row = metrics(cut / "r1-pg" / "metrics.jsonl")[0]
    for key in ("monitor/length_corr", "monitor/repetition", "monitor/distinct_2", "monitor/ood_fraction", "gold"):
        assert key in row, key


@pytest.mark.parametrize("algorithm", ["dpo", "bon"])
def test_pipeline_dpo_and_rejection_sampling_paths(tmp_path, algorithm):
    """algorithm: dpo trains on the round's pairs with no reward model; algorithm: bon samples best-of-n
    against the RM and fine-tunes on the best answers (rejection-sampling fine-tuning). Both end with a
    held-out evaluation against the reference by the gold metric."""
    rl = ({"batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "max_steps": 2, "max_length": 64} if algorithm == "dpo"
          else {"n": 3, "max_new_tokens": 8, "max_length": 64, "limit": 8,
                "sft": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "lr": 1e-3, "max_length": 64}})
    cfg = pipeline_config(tmp_path, algorithm, algorithm=algorithm, rl=rl,
                          evaluate={"eval_prompts": 5, "max_new_tokens": 8})
    if algorithm == "dpo":
        cfg.pop("reward_model")
    run_in_process(write_config(tmp_path, cfg))
    pipe = tmp_path / algorithm / "pipe"
    stages = [s["name"] for s in json.loads((pipe / "manifest.json").read_text())["stages"]]
    assert stages == (["r1-feedback", "r1-dpo", "r1-eval"] if algorithm == "dpo"
                      else ["r1-feedback", "r1-rm", "r1-bon", "r1-sft-best", "r1-eval"])
    result = json.loads((pipe / "r1-eval" / "eval.json").read_text())
    assert set(result["rewards"]) == ({"gold"} if algorithm == "dpo" else {"reward", "gold"})
    assert abs(result["kl"]) > 1e-4  # the policy moved (k1 on 5 samples may come out negative)
