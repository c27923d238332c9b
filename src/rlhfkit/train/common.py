"""Training machinery every stage shares: the accelerator, model set-up (LoRA, dropout, gradient
checkpointing), AdamW with warmup and cosine decay, the data order, and the progress bar.

Scale-out goes through ``accelerate launch`` (DDP, FSDP, DeepSpeed); nothing here is a home-made
distributed engine. One optimiser step consumes ``batch_size`` examples over all processes: each
process takes its contiguous share of the step's examples and splits it into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from rlhfkit.config import ModelArgs, OptimArgs, accumulation_steps, announce
from rlhfkit.data.batching import split_by_tokens
from rlhfkit.errors import ConfigError, StoppedError
from rlhfkit.models import apply_lora, disable_dropout, merged_fp32
from rlhfkit.models.loading import copy_out_of_files
from rlhfkit.models.quant import is_4bit, nf4_config, products_in_compute_dtype
from rlhfkit.platform.distributed import (
    broadcast_weights,
    deepspeed_requested,
    fsdp_requested,
    full_model,
    keep_skeleton,
    shards_parameters,
)
from rlhfkit.platform.kernels import release_freed_memory
from rlhfkit.platform.placement import (
    autocast_dtype,
    make_accelerator,
    precision_text,
    resolve_precision,
    world_size,
)
from rlhfkit.run import NonFiniteError, Run, check_finite


def prepare_model(model, cfg: ModelArgs, modules_to_save: list[str] | None = None):
    """Dropout off, frozen bottom layers, gradient checkpointing, LoRA, then frozen linear weights
    in the autocast dtype under bf16 or fp16 mixed precision (those left, and a 4-bit base's, copied out of the loaded file's
    mapping): in that order, on a freshly loaded model."""
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.trainable_layers > 0:
        freeze_bottom(model, cfg.trainable_layers, keep=modules_to_save or [])
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                           modules_to_save=modules_to_save)
    half = autocast_dtype(cfg.mixed_precision)
    if half is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and not is_4bit(module):
                module.to(half)
    if cfg.load_in_4bit:
        products_in_compute_dtype(model)
    if half is not None or cfg.load_in_4bit:  # the linears' loaded weights were replaced:
        copy_out_of_files(model)  # those left in fp32 no longer hold the whole loaded file in memory
    model.train()
    return model


def quantization(cfg: ModelArgs):
    """The base model's quantisation config under --load-in-4bit (QLoRA: NF4, products in the mixed
    precision's dtype), None otherwise."""
    if not cfg.load_in_4bit:
        return None
    if cfg.lora_r <= 0:
        raise ConfigError("--load-in-4bit trains a LoRA adapter on a frozen 4-bit base: set --lora-r (e.g. 16)")
    if fsdp_requested() or deepspeed_requested():
        raise ConfigError(f"--load-in-4bit under {'FSDP' if fsdp_requested() else 'DeepSpeed'}: bitsandbytes' 4-bit "
                          "weights are not sharded here; use one process or DDP (configs/accelerate/ddp.yaml)")
    return nf4_config(autocast_dtype(cfg.mixed_precision) or torch.float32)


def freeze_bottom(model, trainable: int, keep: list[str]) -> None:
    """Freeze everything but the top ``trainable`` decoder layers, the final norm and ``keep``."""
    layers = next(m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList))
    top = {id(p) for layer in list(layers)[-trainable:] for p in layer.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad = id(p) in top or any(name.startswith(k) or f".{k}." in f".{name}" for k in keep) or (
            "norm" in name and "layers." not in name)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier for 0-based step ``step``: linear warmup over ``warmup`` steps,
    then cosine decay towards ``min_ratio`` at step ``total``:

        f(s) = (s + 1) / (warmup + 1)                                            for s < warmup
        f(s) = min + (1 - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2   after

    >>> lr_factor(0, 10, 1), lr_factor(1, 10, 1), lr_factor(10, 10, 1)
    (0.5, 1.0, 0.0)
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg: OptimArgs, total_steps: int):
    """AdamW over trainable parameters (weight decay on matrices only) and its LR schedule."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio))
    return optimizer, scheduler


@dataclass
class BatchPlan:
    """Which examples each process sees at each optimiser step.

    Epoch e visits the examples in the order ``random.Random(seed + e).shuffle``; step s of the
    epoch takes positions [s*B, (s+1)*B) of that order, wrapping around at the end so no example
    is dropped (the last batch of an epoch repeats a few from its start). Process r of W takes the
    r-th contiguous share and splits it into micro-batches. The plan depends only on the step number,
    so resuming at step s reproduces the same data exactly.
    """

    n: int
    batch_size: int
    micro_batch_size: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    lengths: list[int] | None = None  # when given, each process's share is sorted by length before
    # it is cut into micro-batches: less padding, and the same step gradient (the same examples)
    token_budget: int = 0  # > 0 (with lengths): micro-batches cut by padded tokens, not by count

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("no training examples")
        # with a token budget the micro-batches are cut by tokens: only the split over processes is checked
        self.accum = accumulation_steps(self.batch_size, 1 if self.token_budget else self.micro_batch_size, self.world)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        idx = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(idx)
        return idx

    def step_indices(self, step: int) -> list[int]:
        """All examples of optimiser step ``step`` (0-based), over all processes."""
        epoch, s = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        return [order[(s * self.batch_size + i) % self.n] for i in range(self.batch_size)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches for step ``step``."""
        share = self.batch_size // self.world
        mine = self.step_indices(step)[self.rank * share: (self.rank + 1) * share]
        if self.lengths is not None:
            mine = sorted(mine, key=lambda i: self.lengths[i])
            if self.token_budget:
                return split_by_tokens(mine, [self.lengths[i] for i in mine], self.token_budget)
        m = self.micro_batch_size
        return [mine[i: i + m] for i in range(0, share, m)]


def total_steps(cfg: OptimArgs, plan: BatchPlan) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * plan.steps_per_epoch


def save_hf(accelerator, model, tokenizer, folder) -> None:
    """Save ``model`` in Hugging Face format, LoRA merged in, with its tokenizer. Every process calls it
    (a sharded model is gathered first); the main process writes."""
    unwrapped = accelerator.unwrap_model(model)
    plain = full_model(accelerator, model)
    if not accelerator.is_main_process:
        return
    if accelerator.device.type == "cpu":
        release_freed_memory()  # what sampling and evaluation left: the copy below fits in it
    plain = merged_fp32(plain, copied=plain is unwrapped)  # merge in fp32, save fp32
    # safetensors holds each file's bytes in memory while writing it: files of at most 200 MB
    plain.save_pretrained(folder, safe_serialization=True, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# the pieces of a training stage's loop that every stage shares


def start_stage(cfg, stage: str, inputs: dict[str, str], accum: int | None = None):
    """Accelerator, run directory and a main-process ``log`` for a stage; prints the config.
    Validates the batch arithmetic before anything is loaded (``accum``: the stage worked out its
    own micro-batches per optimiser step, as the RL stages do)."""
    if accum is None:
        accum = accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world_size())
    cfg.mixed_precision, why = resolve_precision(cfg.mixed_precision)  # saved resolved in config.yaml
    accelerator = make_accelerator(cfg, accum)
    # every random draw of the stage (LoRA init, heads, dropout-free sampling) from the run's seed, a
    # different one per process (reference §1a item 6); DDP copies rank 0's initial weights to all
    from accelerate.utils import set_seed

    set_seed(cfg.seed + accelerator.process_index * 100003)
    main = accelerator.is_main_process
    run = Run.open(cfg, stage, inputs=inputs, is_main=main)
    run.update_manifest(precision={"choice": cfg.mixed_precision, "reason": why})
    if main:
        announce(cfg, stage, run.path, precision_text(cfg.mixed_precision, why))
    log = print if main else (lambda *a, **k: None)
    return accelerator, run, log


def prepare_training(accelerator, run, cfg, model, n_examples: int, log, lengths: list[int] | None = None,
                     token_budget: int = 0):
    """Batch plan, optimiser and schedule, ``accelerator.prepare``, and the resume point.

    Returns (model, optimizer, scheduler, plan, steps, start_step)."""
    if token_budget and (accelerator.is_fsdp2 or accelerator.distributed_type == DistributedType.DEEPSPEED):
        raise ConfigError(f"--micro-batch-tokens under {'FSDP' if accelerator.is_fsdp2 else 'DeepSpeed'}: processes "
                          "would make different numbers of passes per step (DeepSpeed steps after a fixed number); "
                          "use --micro-batch-size")
    plan = BatchPlan(n_examples, cfg.batch_size, cfg.micro_batch_size, world_size(), accelerator.process_index,
                     cfg.seed, lengths=lengths, token_budget=token_budget)
    steps = total_steps(cfg, plan)
    model, optimizer, scheduler, start = prepare_optimisation(accelerator, run, cfg, model, steps, log)
    return model, optimizer, scheduler, plan, steps, start


def prepare_optimisation(accelerator, run, cfg, model, updates: int, log):
    """Optimiser and schedule over ``updates`` optimiser steps, ``accelerator.prepare``, and the
    resume point. Returns (model, optimizer, scheduler, start_step)."""
    optimizer, scheduler = build_optimizer(model, cfg, updates)
    if shards_parameters(accelerator):
        keep_skeleton(model)
        broadcast_weights(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.device.type == "cpu":
        release_freed_memory()  # the fp32 weights that bf16 storage and sharding replaced
    start = run.load_checkpoint(accelerator)["step"] if cfg.resume else 0
    if start:
        log(f"resumed {run.path} at step {start}")
    return model, optimizer, scheduler, start


def backward(accelerator, loss) -> None:
    """Backward of one micro-batch's share of the step's loss. accelerate divides by the
    accumulation steps and DDP averages over processes: both are undone, so the step's gradient is
    that of the loss over the whole global batch (reference §8 item 9)."""
    accelerator.backward(loss * accelerator.gradient_accumulation_steps * accelerator.num_processes)


def micro_step(accelerator, model, last: bool):
    """The context of one micro-batch's forward and backward. With a fixed number of micro-batches per
    step it is accelerate's ``accumulate``; when the count varies (micro-batches cut by a token
    budget, accumulation 1 for accelerate) gradients are synchronised across processes only on the
    step's last micro-batch, so every process makes exactly one synchronised backward per step."""

    if accelerator.gradient_accumulation_steps > 1:
        return accelerator.accumulate(model)
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, step: int) -> tuple[float, float]:
    """Clip, check for NaN/inf, step, schedule, zero. Returns (grad norm, the lr this step used)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if accelerator.scaler is None:  # under fp16 loss scaling an overflow skips the step (the scaler's call)
        check_finite(step, grad_norm=grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # the schedule follows the steps taken
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cpu":
        release_freed_memory()
    return float(grad_norm), lr


def should_save(cfg, step: int, steps: int) -> bool:
    """Whether to write a checkpoint after optimiser step ``step`` (1-based) of ``steps``: every
    ``save_every`` steps, and always after the last; with ``save_every`` 0 or less, only after the last.

    >>> [s for s in range(1, 6) if should_save(type("C", (), {"save_every": 2}), s, 5)]
    [2, 4, 5]
    >>> [s for s in range(1, 6) if should_save(type("C", (), {"save_every": 0}), s, 5)]
    [5]
    """
    return step == steps or (cfg.save_every > 0 and step % cfg.save_every == 0)


class stop_on_nonfinite:
    """``with stop_on_nonfinite(run):`` marks the run failed and exits with the last good
    checkpoint named when a loss, reward or gradient turns NaN or inf."""

    def __init__(self, run):
        self.run = run

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, NonFiniteError):
            self.run.fail(str(err))
            raise StoppedError(f"stopped: {err}; the last good checkpoint is {self.run.latest_checkpoint()}") from None
        return False
