"""Stage 0: supervised fine-tuning on demonstrations (``rlhfkit sft``).

Loss on response tokens only, EOS appended to every response, optional packing. The loss is the
token mean over the whole optimiser step, so batch 8 equals batch 1 x accumulation 8 and two
processes equal one process with accumulation 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import DataArgs, ModelArgs, OptimArgs, RunArgs
from rlhfkit.data.batching import collate
from rlhfkit.data.split import load_train_eval
from rlhfkit.data.template import Encoded, encode_examples
from rlhfkit.errors import ConfigError
from rlhfkit.losses import sft_loss, token_nll
from rlhfkit.models import count_parameters, load_causal_lm
from rlhfkit.platform.distributed import gathered
from rlhfkit.platform.kernels import cpu_kernels
from rlhfkit.run import Run, check_finite, progress
from rlhfkit.train.common import (
    backward,
    optimizer_step,
    prepare_model,
    prepare_training,
    quantization,
    save_hf,
    should_save,
    start_stage,
    stop_on_nonfinite,
)


@dataclass
class SFTConfig(RunArgs, OptimArgs, DataArgs, ModelArgs):
    """Supervised fine-tuning: loss on response tokens only, EOS appended."""

    packing: bool = False
    """Concatenate each micro-batch into one row with restarting position ids (no padding, no
    cross-attention between examples)."""

    def resolve(self) -> SFTConfig:
        if not self.train:
            raise ConfigError("sft: --train FILE is required (demonstrations: prompt/response, messages, or preferences; "
                              "several as a,b or a glob)")
        return self


def n_supervised(examples: list[Encoded]) -> int:
    """Tokens that carry loss: every response token (the first one is predicted from the prompt)."""
    return sum(len(e.input_ids) - e.prompt_len for e in examples)


def load_data(cfg: SFTConfig, tokenizer, log=print):
    """Demonstrations for training and evaluation, encoded, with a report of what was not used."""
    records, held, loaded = load_train_eval(cfg, "demonstration", log)
    out = []
    for name, recs in (("train", records), ("eval", held)):
        enc, report = encode_examples(tokenizer, [(r.prompt, r.response, r.source) for r in recs],
                                      cfg.max_length, cfg.truncation)
        if report["truncated"] or report["dropped"]:
            log(f"{name}: {report['truncated']} truncated ({cfg.truncation}), {report['dropped']} dropped as "
                f"longer than {cfg.max_length} tokens, e.g. {report['dropped_examples'][:2]}")
        out.append((enc, report))
    return out[0], out[1], loaded


def run(cfg: SFTConfig) -> Run:
    cfg.resolve()
    accelerator, run, log = start_stage(cfg, "sft", {"train": cfg.train, "eval": cfg.eval, "model": cfg.model})
    with stop_on_nonfinite(run), cpu_kernels(accelerator.device, cfg.gradient_checkpointing):  # oneDNN linears on a CPU
        # 1. model and data
        model, tokenizer = load_causal_lm(cfg.model, seed=cfg.seed, quantization=quantization(cfg))
        (train_set, train_report), (eval_set, _), loaded = load_data(cfg, tokenizer, log)
        run.update_manifest(data={"train": train_report | {"skipped_malformed": loaded.skipped}})
        model = prepare_model(model, cfg)
        trainable, total = count_parameters(model)
        log(f"model {cfg.model}: {trainable:,} of {total:,} parameters trainable")
        model, optimizer, scheduler, plan, steps, start = prepare_training(accelerator, run, cfg, model,
                                                                           len(train_set), log)
        if not start and eval_set:
            before = evaluate(model, eval_set, tokenizer.pad_token_id, cfg, accelerator)
            run.log(0, eval_loss=before)
            log(f"eval loss before training {before:.4f} on {len(eval_set)} examples")

        # 2. the loop: one optimiser step per iteration
        bar = progress(range(start, steps), accelerator.is_main_process and cfg.progress, "sft", start, steps)
        for step in bar:
            micro = [[train_set[i] for i in mb] for mb in plan.micro_batches(step)]
            # the global token count normalises every micro-batch's sum (reference §8 item 9)
            n_tokens = accelerator.reduce(torch.tensor(float(sum(n_supervised(mb) for mb in micro)),
                                                       device=accelerator.device), "sum").item()
            step_loss = torch.zeros((), device=accelerator.device)
            for mb in micro:
                batch = {k: v.to(accelerator.device) for k, v in collate(mb, tokenizer.pad_token_id, cfg.packing).items()}
                labels = batch.pop("labels")
                with accelerator.accumulate(model):
                    loss = sft_loss(model(**batch, use_cache=False).logits, labels, n_tokens)
                    check_finite(step + 1, loss=loss)
                    backward(accelerator, loss)
                step_loss += loss.detach()
            grad_norm, lr = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step + 1)
            loss = accelerator.reduce(step_loss, "sum").item()

            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens),
                       "epoch": round((step + 1) / plan.steps_per_epoch, 4)}
            if eval_set and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                metrics["eval_loss"] = evaluate(model, eval_set, tokenizer.pad_token_id, cfg, accelerator)
            run.log(step + 1, **metrics)
            if accelerator.is_main_process and cfg.progress:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if should_save(cfg, step + 1, steps):
                run.save_checkpoint(accelerator, step + 1)

        # 3. final evaluation and the Hugging Face model
        logged = [m["loss"] for m in run.metrics() if "loss" in m] if accelerator.is_main_process else []
        summary = {"steps": steps, "final_loss": logged[-1] if logged else None}
        if eval_set:
            summary["eval_loss"] = evaluate(model, eval_set, tokenizer.pad_token_id, cfg, accelerator)
            log(f"eval loss {summary['eval_loss']:.4f} on {len(eval_set)} examples")
        run.save_final(lambda folder: save_hf(accelerator, model, tokenizer, folder))
        run.finish(**summary)
        log(run.result())
        return run


@torch.no_grad()
def evaluate(model, examples: list[Encoded], pad_id: int, cfg: SFTConfig, accelerator) -> float:
    """Token-mean NLL of the responses, each process taking every world-th example."""
    model.eval()
    mine = examples[accelerator.process_index:: accelerator.num_processes]
    nll = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with gathered(accelerator, model):  # processes may hold different numbers of examples
        for i in range(0, len(mine), cfg.micro_batch_size):
            chunk = mine[i: i + cfg.micro_batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id, cfg.packing).items()}
            labels = batch.pop("labels")
            nll += token_nll(model(**batch, use_cache=False).logits, labels).sum()
            count += n_supervised(chunk)
    model.train()
    return (accelerator.reduce(nll, "sum") / accelerator.reduce(count, "sum").clamp(min=1)).item()
