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

import tempfile
import time
from pathlib import Path

from _common import main, trl_pairs, write_pairs


def run_rlhfkit(args, records, step_times):
    from rlhfkit.train.reward import RMConfig, train

    tmp = Path(tempfile.mkdtemp())
    data = write_pairs(records, tmp / "pairs.jsonl")
    cfg = RMConfig(train=str(data), output_dir=str(tmp / "runs"), name="bench", batch_size=args.batch,
                   micro_batch_size=args.micro or args.batch, max_length=args.max_length, lr=1e-5,
                   mixed_precision="bf16", progress=False, save_every=10**9, warmup_ratio=0.0)
    # shuffle off would favour neither; both frameworks shuffle with their own seed
    run = train(cfg)
    for row in run.metrics():
        step_times.append(row["time"])


def run_trl(args, records, step_times):
    import torch
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path("smollm2-135m-instruct")),
                                                               num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    ds = trl_pairs(records)
    t0 = time.time()

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_times.append(time.time() - t0)

    cfg = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_length=args.max_length,
                       bf16=True, use_cpu=True, num_train_epochs=1, learning_rate=1e-5, logging_steps=1000,
                       save_strategy="no", report_to=[], dataloader_num_workers=0, warmup_steps=0)
    RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()]).train()


if __name__ == "__main__":
    main(__file__, __doc__, {"rlhfkit": run_rlhfkit, "trl": run_trl})
