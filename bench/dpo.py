"""DPO training throughput: rlhfkit against TRL's DPOTrainer, side by side in one run.

Same model (the bundled SmolLM2-135M-Instruct with LoRA r=16 on every linear layer, the reference
being the adapter switched off in both), the same HH-RLHF harmless pairs, batch, max length,
optimiser, beta and dtype (bf16 autocast). Each framework runs in its own process; throughput counts
the tokens both would see unshared, len(prompt + chosen) + len(prompt + rejected), over the steps
after the first (warm-up) step.

    make bench-venv                      # .venv-bench: rlhfkit plus TRL (TRL only lives here)
    .venv-bench/bin/python bench/dpo.py --pairs 48 --batch 8

Prints one JSON line per framework and the ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import main, trl_pairs, write_pairs

LORA_R, LORA_ALPHA, LR, BETA = 16, 32, 5e-5, 0.1


def run_rlhfkit(args, records, step_times):
    from rlhfkit.train.dpo import DPOConfig, train

    tmp = Path(tempfile.mkdtemp())
    cfg = DPOConfig(train=str(write_pairs(records, tmp / "pairs.jsonl")), output_dir=str(tmp / "runs"), name="bench",
                    batch_size=args.batch, micro_batch_size=args.micro or args.batch, max_length=args.max_length,
                    lr=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA, mixed_precision="bf16", progress=False,
                    save_every=10**9, warmup_ratio=0.0)
    run = train(cfg)
    for row in run.metrics():
        if row["step"] > 0:
            step_times.append(row["time"])


def run_trl(args, records, step_times):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_path("smollm2-135m-instruct")), dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    t0 = time.time()

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_times.append(time.time() - t0)

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_length=args.max_length,
                    bf16=True, use_cpu=True, num_train_epochs=1, learning_rate=LR, beta=BETA, logging_steps=1000,
                    save_strategy="no", report_to=[], dataloader_num_workers=0, warmup_steps=0)
    peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    DPOTrainer(model=model, args=cfg, train_dataset=trl_pairs(records), processing_class=tokenizer,
               peft_config=peft, callbacks=[Clock()]).train()


if __name__ == "__main__":
    main(__file__, __doc__, {"rlhfkit": run_rlhfkit, "trl": run_trl})
