"""What the RL training stages (``ppo``, ``pg``) share: their KL flags, the policy, the set-up before
the loop (run, policy, reference, rollout engine, reward, prompts, schedule), the logprob phase,
minibatches, logging, and the held-out comparison of the policy with its reference at the end. The
rollout vocabulary (sampling flags, prompts, the rollout phase, the reference) is in
:mod:`rlhfkit.rollout.phase`; each algorithm's loop stays in its own file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.eval.monitors import Monitor
from rlhfkit.eval.policy import compare_policies, summary_line
from rlhfkit.eval.report import plot_series, rows_of, write_report
from rlhfkit.losses.advantages import masked_var
from rlhfkit.losses.kl import kl_controller, kl_penalty
from rlhfkit.losses.ppo import aggregate_total, rollout_correction
from rlhfkit.models import load_causal_lm
from rlhfkit.platform.distributed import gathered, shard_frozen, shards_parameters
from rlhfkit.platform.kernels import release_freed_memory
from rlhfkit.platform.placement import world_size
from rlhfkit.rollout.engine import RolloutEngine, make_engine
from rlhfkit.rollout.phase import Batch, Prompts, Reference, load_prompts, response_stats
from rlhfkit.rollout.rewards import CompositeReward, ModelReward, reward_from
from rlhfkit.rollout.sampler import Rollout, response_logprobs, response_values
from rlhfkit.train.common import (
    BatchPlan,
    prepare_model,
    prepare_optimisation,
    quantization,
    save_hf,
    should_save,
    start_stage,
    total_steps,
)


@dataclass
class KLArgs:
    beta: float = 0.05
    """KL coefficient (initial value when adaptive)."""
    kl_target: float = 0.0
    """> 0: adaptive KL controller (Ziegler et al.) steering the per-sequence KL to this target."""
    kl_horizon: int = 10000
    """Adaptive KL horizon."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020)."""
    reference: str = ""
    """Reference policy ('': the policy's own starting weights, i.e. the base model with the LoRA adapter
    switched off, or a frozen copy); or another model, e.g. the SFT model when the policy starts elsewhere."""


@dataclass
class CorrectionArgs:
    is_level: Literal["token", "sequence", "off"] = "token"
    """Importance-sampling correction for the rollout engine's mismatch with the trainer: the policy
    loss is weighted by pi_old / pi_engine per token or per sequence, or not at all (losses/ppo.py,
    rollout_correction). It is 1 up to rounding with the hf engine."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """truncate: min(ratio, is_cap) (TIS); mask: drop tokens whose ratio leaves [1/is_cap, is_cap]."""
    is_cap: float = 2.0
    """C, the truncation (or masking) bound of the importance ratio."""


def engine_correction(cfg, rollout: Rollout, old_logp: torch.Tensor, mask: torch.Tensor):
    """The policy loss's importance weights for the engine's mismatch (the mask itself with
    ``--is-level off``), and what is logged every step as sums over tokens: |delta logprob|, tokens whose
    ratio pi_old / pi_engine leaves [0.8, 1.25], and tokens whose weight the cap or mask changed."""
    level = "token" if cfg.is_level == "off" else cfg.is_level
    weight, rho = rollout_correction(old_logp, rollout.logprobs, mask, cfg.is_cap, level, cfg.is_mode)
    token_ratio = torch.exp((old_logp - rollout.logprobs).clamp(-20.0, 20.0))
    stats = {"engine_logprob_diff": ((old_logp - rollout.logprobs).abs() * mask).sum(),
             "engine_ratio_outside": (((token_ratio < 0.8) | (token_ratio > 1.25)) * mask).sum(),
             "is_truncated": (((weight - rho).abs() > 1e-6) * mask).sum(),
             "is_weight": (weight * mask).sum(), "tokens": mask.sum()}
    return (mask if cfg.is_level == "off" else weight), stats


# ---------------------------------------------------------------------------------------------
# policy and reference


def load_policy(cfg):
    """The policy (dropout off, LoRA or partly frozen, as the config says) and its tokenizer."""
    policy, tokenizer = load_causal_lm(cfg.model, seed=cfg.seed, quantization=quantization(cfg))
    return prepare_model(policy, cfg), tokenizer


# ---------------------------------------------------------------------------------------------
# curves


def plot_curves(metrics_path, png_path, keys: list[str], title: str = "") -> bool:
    """One small panel per metric over steps, from metrics.jsonl (the report's plot_series). False when
    matplotlib is missing or there is nothing to draw."""
    png_path = Path(png_path)
    return plot_series(rows_of(Path(metrics_path)), [(k, k) for k in keys], png_path.parent, png_path.name,
                       title) is not None


# ---------------------------------------------------------------------------------------------
# the pieces of an RL step that PPO and the critic-free stages share


@dataclass
class RLSetup:
    """What an RL stage has before its loop: the accelerator and run, the policy and its reference, the
    reward, the prompts and their schedule, and the KL controller."""

    accelerator: object
    run: object
    log: object
    policy: object
    tokenizer: object
    reference: Reference
    reward: CompositeReward
    prompts: Prompts
    held: Prompts
    plan: object
    steps: int
    kl_ctl: object
    monitor: Monitor
    gold: CompositeReward | None  # watched, never optimised (None without --gold)
    engine: RolloutEngine | None = None  # made by prepare_rl, over the prepared policy


def start_rl(cfg, stage: str, k: int = 1, inputs: dict | None = None) -> RLSetup:
    """Check the batch arithmetic, open the run, load the policy, reference, reward and prompts, and
    plan which prompts each step samples (seeded, the same on resume)."""
    world = world_size()
    _, accum = rl_batch_plan(cfg, world, k)
    if cfg.load_in_4bit and cfg.rollout != "hf":
        raise ConfigError(f"--rollout {cfg.rollout} with --load-in-4bit: the engine takes full-precision weights "
                          "at every sync; use --rollout hf (it samples from the 4-bit model itself)")
    accelerator, run, log = start_stage(cfg, stage, {"train": cfg.train, "eval": cfg.eval, "model": cfg.model,
                                                     **(inputs or {})}, accum=accum)
    policy, tokenizer = load_policy(cfg)
    reference = Reference(policy, cfg.mixed_precision, cfg.reference)
    reward = reward_from(cfg, cfg.reward, accelerator.device)
    gold = reward_from(cfg, cfg.gold, accelerator.device) if cfg.gold else None
    prompts, held = load_prompts(cfg, tokenizer, log)
    plan = BatchPlan(len(prompts.ids), cfg.batch_size, cfg.batch_size // world, world, accelerator.process_index,
                     cfg.seed)
    kl_ctl = kl_controller(cfg.beta, cfg.kl_target, cfg.kl_horizon)
    accelerator.register_for_checkpointing(kl_ctl)
    ref = cfg.reference or ("the adapter switched off" if reference.copy is None else "a frozen copy")
    log(f"{stage}: policy {cfg.model} (reference: {ref}), reward {reward.name}; {len(prompts.ids)} train / "
        f"{len(held.ids)} held-out prompts")
    return RLSetup(accelerator, run, log, policy, tokenizer, reference, reward, prompts, held, plan,
                   total_steps(cfg, plan), kl_ctl, Monitor(cfg, run.path if run.is_main else None), gold)


def prepare_rl(s: RLSetup, cfg, model, policy_of=lambda m: m):
    """Optimiser over every update of the run, ``accelerator.prepare``, resume; the reference on the
    device; the rollout engine over the prepared policy (``policy_of`` picks it out of the unwrapped
    model). Returns (model, optimizer, scheduler, start step, the unwrapped model)."""
    if shards_parameters(s.accelerator) and cfg.rollout != "hf":
        raise ConfigError(f"--rollout {cfg.rollout} under {'FSDP' if s.accelerator.is_fsdp2 else 'DeepSpeed ZeRO-3'}: "
                          "its weight sync needs whole tensors, not shards; use --rollout hf (it samples with the "
                          "gathered weights) or DDP")
    updates = s.steps * cfg.ppo_epochs * cfg.num_minibatches
    model, optimizer, scheduler, start = prepare_optimisation(s.accelerator, s.run, cfg, model, updates, s.log)
    s.reference.to(s.accelerator.device)
    for name, frozen in frozen_models(s):  # under FSDP: sharded as the policy is
        shard_frozen(s.accelerator, frozen, name, s.log)
    s.monitor.restore(s.run.metrics())  # on resume: the steps before the checkpoint
    inner = s.accelerator.unwrap_model(model)
    s.engine = make_engine(cfg.rollout, policy_of(inner), s.accelerator.device)
    return model, optimizer, scheduler, start, inner


def frozen_models(s: RLSetup) -> list[tuple[str, torch.nn.Module]]:
    """The run's frozen models besides the policy, named: a separate reference (full fine-tuning or
    --reference) and the reward models of --reward and --gold. Every process calls each of them the same
    number of times in a step (on its own share of the batch), so FSDP can shard them."""
    rewards = [s.reward, *([s.gold] if s.gold is not None else [])]
    models = [("the reference", s.reference.copy)] if s.reference.copy is not None else []
    return models + [(f"reward model {src.name}", src.model) for r in rewards for _, src in r.parts
                     if isinstance(src, ModelReward)]


def step_generator(cfg, step: int, rank: int) -> torch.Generator:
    """The minibatch-shuffling RNG of one step on one process: a function of (seed, step, rank) alone, so
    a resumed run shuffles exactly as the uninterrupted one did (sampling: :func:`row_generators`)."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)


def row_generators(cfg, step: int, rank: int, rows: int) -> list[torch.Generator]:
    """The sampling RNG of each of this process's ``rows`` responses at one step: row i's stream is a
    function of (seed, step, the row's place in the step's whole batch) alone, so the same responses are
    drawn whatever the number of processes, and a resumed run samples what the uninterrupted one did."""
    first = rank * rows
    return [torch.Generator().manual_seed(hash((cfg.seed, step, first + i)) & (2**63 - 1)) for i in range(rows)]


def end_step(s: RLSetup, cfg, bar, step: int, metrics: dict, batch: Batch) -> None:
    """The monitors (gold score, OOD fraction, reward-hacking alarms), then log the step, show it on the
    bar, checkpoint when due."""
    gold = None
    if s.gold is not None:
        gold = s.gold.score([r.prompt for r in batch.records], batch.texts, [r.meta for r in batch.records])
        metrics["gold"] = sum(gold) / len(gold)
    ood = s.reward.last_ood
    metrics.update(s.monitor.observe(step + 1, batch.texts, batch.raw_scores.tolist(), metrics["kl"], gold, ood))
    s.run.log(step + 1, **metrics)
    if s.accelerator.is_main_process and cfg.progress:
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.2f}", len=f"{metrics['response_length']:.0f}")
    if should_save(cfg, step + 1, s.steps):
        s.run.save_checkpoint(s.accelerator, step + 1)


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad a (B, w) tensor with zeros to (B, width)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def rl_batch_plan(cfg, world: int, k: int = 1) -> tuple[int, int]:
    """(sequences per minibatch on one process, micro-batches per optimiser step), checked once:
    batch_size prompts x k samples, split over processes, then into num_minibatches, then micro-batches."""
    rows = cfg.batch_size * k
    if cfg.batch_size % world or (rows // world) % cfg.num_minibatches:
        raise ConfigError(f"batch_size {cfg.batch_size} x {k} sample(s) must split into {world} process(es) x "
                         f"{cfg.num_minibatches} minibatch(es)")
    minibatch = rows // world // cfg.num_minibatches
    if minibatch % cfg.micro_batch_size:
        raise ConfigError(f"a minibatch of {minibatch} sequences per process is not a multiple of "
                         f"micro_batch_size {cfg.micro_batch_size}")
    return minibatch, minibatch // cfg.micro_batch_size


@torch.no_grad()
def logprob_phase(policy, reference: Reference, rollout: Rollout, temperature: float, micro: int, critic=None,
                  group: int = 1, old_too: bool = True):
    """# 2. teacher-forced logprobs of pi_old and pi_ref at the sampling temperature (and the critic's
    values), micro-batch by micro-batch: each (B, R), 0 on padding. ``group`` > 1 (it divides ``micro``):
    the rows come in groups that share their prompt, each computed as one packed row. ``old_too`` False:
    pi_old is left at 0, for the update's own forward to fill in."""
    width = rollout.response_ids.shape[1]
    old, ref, values = [], [], []
    for mb in micro_slices(rollout.response_ids.shape[0], micro):
        sub = rollout.select(mb)
        old.append(widen(response_logprobs(policy, sub, temperature, group) if old_too
                         else torch.zeros_like(sub.logprobs), width))
        ref.append(widen(reference.logprobs(policy, sub, temperature, group), width))
        if critic is not None:
            values.append(widen(response_values(critic, sub), width))
    if rollout.response_ids.device.type == "cpu":
        release_freed_memory()  # the passes' logits: the update starts from what is live
    return torch.cat(old), torch.cat(ref), (torch.cat(values) if critic is not None else None)


def minibatches(n: int, epochs: int, num_minibatches: int, micro: int, generator, group: int = 1):
    """# 6. for each epoch a fresh shuffle of the n sequences, cut into minibatches (one optimiser step
    each), each cut into micro-batches (index tensors). ``group`` > 1 (it divides ``micro``): whole groups
    of that many consecutive sequences are shuffled, so every micro-batch holds whole groups, in order."""
    size = n // num_minibatches
    for _ in range(epochs):
        order = (torch.randperm(n // group, generator=generator)[:, None] * group + torch.arange(group)).reshape(-1)
        for m in range(num_minibatches):
            rows = order[m * size: (m + 1) * size]
            yield [rows[s] for s in micro_slices(len(rows), micro)]


def loss_total(accelerator, mask: torch.Tensor, micro: list, mode: str) -> torch.Tensor:
    """The aggregation denominator of one minibatch over every micro-batch and process."""
    return accelerator.reduce(torch.tensor(aggregate_total([mask[i] for i in micro], mode, mask.shape[1])), "sum")


def rollout_metrics(accelerator, batch: Batch, old_logp, ref_logp, mask, beta: float, correction: dict) -> dict:
    """score, KL per sequence (k1 summed over tokens), the non-score reward -beta*KL, response length,
    EOS rate, and how far the engine's logprobs are from the trainer's: the largest difference
    (0 up to numerics with the hf engine) and the token means of :func:`engine_correction`."""
    seq_kl = (kl_penalty(old_logp, ref_logp, "k1") * mask).sum(-1)
    mean = lambda x: accelerator.reduce(x.float().mean(), "mean").item()  # noqa: E731
    return {"score": mean(batch.raw_scores), "score_with_penalty": mean(batch.scores), "kl": mean(seq_kl),
            "non_score_reward": mean(-beta * seq_kl), "beta": beta,
            "logprob_mismatch": (batch.rollout.logprobs - old_logp).abs().mul(mask).max().item(),
            **mean_stats(accelerator, correction), **response_stats(batch.rollout)}


def sum_stats(sums: dict, stats: dict) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + v


def mean_stats(accelerator, sums: dict) -> dict:
    """Token means of summed loss statistics (``tokens`` is the count)."""
    tot = {k: accelerator.reduce(v, "sum").item() for k, v in sums.items()}
    n = max(tot.pop("tokens"), 1.0)
    return {k: v / n for k, v in tot.items()}


def finish(s: RLSetup, cfg, policy, curves: list[str]):
    """Held-out comparison with the reference (proxy and gold), curves, the report, and the final
    policy in Hugging Face format."""
    accelerator, run, summary = s.accelerator, s.run, {}
    with contextlib.ExitStack() as whole:  # on the main process only: sharded weights whole
        for model in [policy, *(m for _, m in frozen_models(s))]:
            whole.enter_context(gathered(accelerator, model))
        if s.held.ids and accelerator.is_main_process:
            rewards = {"reward": s.reward, **({"gold": s.gold} if s.gold is not None else {})}
            with accelerator.autocast():
                result = compare_policies(s.engine, s.reference.engine(policy, cfg.rollout, s.accelerator.device),
                                          policy, s.reference, s.tokenizer, rewards, s.held, cfg, seed=cfg.seed + 7)
            (run.path / "heldout.json").write_text(json.dumps(result, indent=2))
            summary = {f"heldout_{name}_{k}": v for name, r in result["rewards"].items() for k, v in r.items()}
            summary["heldout_kl"] = result["kl"]
            s.log(summary_line(result))
    curves = curves + ["gold", "monitor/length_corr", "monitor/repetition", "monitor/distinct_2", "monitor/ood_fraction"]
    if accelerator.is_main_process and plot_curves(run.path / "metrics.jsonl", run.path / "curves.png", curves,
                                                   run.path.name):
        s.log(f"curves: {run.path / 'curves.png'}")
    run.save_final(lambda folder: save_hf(accelerator, policy, s.tokenizer, folder))
    run.finish(**summary)
    if accelerator.is_main_process:
        s.log(f"report: {write_report(run.path)}")
    s.log(run.result())
    return run


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else 0.0


