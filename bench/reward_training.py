"""Reward-model training throughput: rlhfkit against TRL's RewardTrainer, side by side in one run.

Same model (the bundled SmolLM2-135M-Instruct with a fresh scalar head, every weight trained), same
HH-RLHF harmless pairs, same batch, max length, optimiser and dtype (bf16 autocast). Each framework
runs in its own process; throughput counts the tokens both would see unshared,
len(prompt + chosen) + len(prompt + rejected), over the steps after the first (warm-up) step.

    make bench-venv                      # .venv-bench: rlhfkit plus TRL (TRL only lives here)
    .venv-bench/bin/python bench/reward_training.py --pairs 96 --batch 8

Prints one JSON line per framework and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def pairs(n: int):
    """The first n single-turn-response pairs of the seed-0 training split."""
    from rlhfkit.data import load_records, split_records

    train, _ = split_records(load_records(HH).records, 512, 0)
    return [r for r in train if isinstance(r.chosen, str) and isinstance(r.rejected, str)][:n]


def logical_tokens(records, tokenizer, max_length: int) -> list[int]:
    from rlhfkit.data import encode_prompt, encode_response

    out = []
    for r in records:
        p = len(encode_prompt(tokenizer, r.prompt))
        out.append(sum(min(max_length, p + len(encode_response(tokenizer, x))) for x in (r.chosen, r.rejected)))
    return out


def run_rlhfkit(args, records, step_times):
    from rlhfkit.train.reward import RMConfig, train

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "pairs.jsonl"
    with open(data, "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n")
    cfg = RMConfig(train=str(data), output_dir=str(tmp / "runs"), name="bench", batch_size=args.batch,
                   micro_batch_size=args.micro or args.batch, max_length=args.max_length, lr=1e-5,
                   mixed_precision="bf16", progress=False, save_every=10**9, warmup_ratio=0.0)
    # shuffle off would favour neither; both frameworks shuffle with their own seed
    run = train(cfg)
    for row in run.metrics():
        step_times.append(row["time"])


def run_trl(args, records, step_times):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path("smollm2-135m-instruct")),
                                                               num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    ds = Dataset.from_list([{"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
                             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in records])
    t0 = time.time()

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_times.append(time.time() - t0)

    cfg = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_length=args.max_length,
                       bf16=True, use_cpu=True, num_train_epochs=1, learning_rate=1e-5, logging_steps=1000,
                       save_strategy="no", report_to=[], dataloader_num_workers=0, warmup_steps=0)
    RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()]).train()


def child(args):
    from rlhfkit.models import load_tokenizer

    records = pairs(args.pairs)
    tokens = logical_tokens(records, load_tokenizer("smollm2-135m-instruct"), args.max_length)
    times: list[float] = []
    (run_rlhfkit if args.framework == "rlhfkit" else run_trl)(args, records, times)
    steps = len(times)
    per_step_tokens = sum(tokens) / steps  # both frameworks see every pair once, in their own order
    tok_s = per_step_tokens * (steps - 1) / (times[-1] - times[0])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"framework": args.framework, "pairs": len(records), "steps": steps, "batch": args.batch,
                      "max_length": args.max_length, "tokens_per_s": round(tok_s, 1),
                      "s_per_step": round((times[-1] - times[0]) / (steps - 1), 3), "peak_rss_gb": round(peak_gb, 2)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=0, help="rlhfkit micro-batch (default: the whole batch, as TRL)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--framework", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.framework:
        return child(args)
    results = {}
    for fw in ("rlhfkit", "trl"):
        cmd = [sys.executable, __file__, "--framework", fw, "--pairs", str(args.pairs), "--batch", str(args.batch),
               "--micro", str(args.micro), "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode:
            sys.exit(f"{fw} failed:\n{out.stderr[-4000:]}")
        results[fw] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[fw]), flush=True)
    ratio = results["rlhfkit"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(json.dumps({"ratio_rlhfkit_over_trl": round(ratio, 2)}))


if __name__ == "__main__":
    main()
