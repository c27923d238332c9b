"""One RL step of rlhfkit against TRL, side by side: RLOO (``RLOOTrainer``) and GRPO (``GRPOTrainer``),
each framework in its own process.

The same everywhere: the bundled SmolLM2-135M-Instruct, the first prompts of examples/prompts.jsonl
in its chat template, k samples per prompt, the same number of new tokens and temperature (top-p 1,
top-k off), LoRA r = 16 / alpha = 32 on every linear layer, fp32, no gradient checkpointing, KL
coefficient 0.05 against the LoRA base (in the reward for RLOO, k1; in the loss for GRPO, k3, as TRL
puts them), one optimiser step per rollout batch over micro-batches of 8, and the same reward: seed
004's rule (configs/rules/concise-python.yaml) scored by rlhfkit's RuleReward, given to TRL as a reward function. A step is sampling, scoring, the reference and old
logprobs, and the update. The steps after the first (warm-up) are timed from each framework's own
per-step log, and peak RSS is the process's.

Needs TRL: ``make bench-venv``, then

    .venv-bench/bin/python bench/rl_step.py                  # both estimators, 4 steps each
    .venv-bench/bin/python bench/rl_step.py --estimators rloo --steps 3

Prints one JSON line per (framework, estimator) and the ratios of seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "rules" / "concise-python.yaml"
PROMPTS = ROOT / "examples" / "prompts.jsonl"


# TRL's GRPOTrainer puts beta * KL (k3) in the loss; its RLOOTrainer puts beta * KL (k1) in the reward, as
# rlhfkit's pg does by default
GRPO_KL = {"kl_in": "loss", "kl_estimator": "k3"}


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def rlhfkit_step(args, out: Path) -> list[float]:
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as train

    cfg = PGConfig(model="smollm2-135m-instruct", train=str(PROMPTS), eval_size=0, eval_prompts=0,
                   reward=f"rule:{RULE}", estimator=args.estimator, samples_per_prompt=args.k, lora_r=16,
                   lora_alpha=32, lr=5e-4, beta=0.05, batch_size=args.prompts, micro_batch_size=8, num_minibatches=1,
                   max_new_tokens=args.new_tokens, temperature=args.temperature, max_steps=args.steps,
                   output_dir=str(out), progress=False, name=f"bench-{args.estimator}", save_every=10**6,
                   warmup_ratio=0.0, **GRPO_KL if args.estimator == "grpo" else {})
    run = train(cfg)
    times = [json.loads(line)["time"] for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:])]  # each step after the first


def trl_step(args, out: Path) -> list[float]:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.rewards import parse_reward

    model, tok = load_causal_lm("smollm2-135m-instruct")
    rule = parse_reward(f"rule:{RULE}")
    rows = [json.loads(line) for line in open(PROMPTS)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])

    def reward(prompts, completions, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return rule.score([p for p in prompts], texts, [{} for _ in texts])

    reward.__name__ = "rule"
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    common = dict(output_dir=str(out), use_cpu=True, bf16=False, learning_rate=5e-4, beta=0.05,
                  num_generations=args.k, per_device_train_batch_size=8,
                  gradient_accumulation_steps=args.prompts * args.k // 8, generation_batch_size=args.prompts * args.k,
                  steps_per_generation=None, num_iterations=1, max_completion_length=args.new_tokens,
                  temperature=args.temperature, top_p=1.0, top_k=0, max_steps=args.steps, logging_steps=1,
                  report_to=[], save_strategy="no", gradient_checkpointing=False, disable_dropout=True,
                  lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, seed=0)
    if args.estimator == "rloo":
        config, trainer_cls = trl.RLOOConfig(**common), trl.RLOOTrainer
    else:
        config, trainer_cls = trl.GRPOConfig(**common, loss_type="grpo", scale_rewards="group"), trl.GRPOTrainer
    trainer = trainer_cls(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
                          callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        steps = (rlhfkit_step if args.framework == "rlhfkit" else trl_step)(args, Path(tmp))
    print(json.dumps({"framework": args.framework, "estimator": args.estimator, "prompts": args.prompts, "k": args.k,
                      "new_tokens": args.new_tokens, "timed_steps": len(steps),
                      "s_per_step": round(statistics.median(steps), 2), "steps_s": [round(s, 2) for s in steps],
                      "peak_rss_gb": peak_rss_gb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", default="rloo,grpo")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    ap.add_argument("--framework", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--estimator", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.framework:
        return child(args)
    results = {}
    for est in args.estimators.split(","):
        for fw in ("rlhfkit", "trl"):
            cmd = [sys.executable, __file__, "--framework", fw, "--estimator", est, "--prompts", str(args.prompts),
                   "--k", str(args.k), "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature),
                   "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if res.returncode:
                sys.exit(f"{fw} {est} failed:\n{res.stderr[-4000:]}")
            results[fw, est] = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(results[fw, est]), flush=True)
        ours, theirs = results["rlhfkit", est], results["trl", est]
        print(json.dumps({"estimator": est, "step_time_rlhfkit_over_trl": round(ours["s_per_step"] / theirs["s_per_step"], 2),
                          "peak_rss_rlhfkit_over_trl": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 2)}), flush=True)


if __name__ == "__main__":
    main()
