"""Reward-model training (``rlhfkit rm train``): pairwise, ranking, rating, orm and prm.

Each kind turns records into *groups* (one prompt and its responses) and has one loss function:

=========  ============================  ==============================================================
kind       records                       loss (losses/preference.py, losses/supervision.py)
=========  ============================  ==============================================================
pairwise   Preference (+ margin)         Bradley-Terry, or margin loss when records carry a margin;
                                         + centring aux loss with --center-coef
ranking    Ranking (K responses)         all C(K,2) pairs per prompt (eq. 18) or Plackett-Luce (eq. 19)
rating     Rating                        regression on the standardised rating, or bad/mid/good classes
orm        StepSolution with `correct`   token-level BCE on completion tokens (eq. 20); a prompt's
                                         solutions form one group, with --orm-rank-coef a ranking term
prm        StepSolution with labels      3-class CE at the last token of each step (eq. 21)
=========  ============================  ==============================================================

With ``--share-prefix`` (default) a group's prompt is run once and its key/value cache reused for
each response: for HH-RLHF pairs, whose chosen and rejected share almost the whole transcript, that
is about half the work, with the same numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import DataArgs, ModelArgs, OptimArgs, RunArgs
from rlhfkit.data import load_records
from rlhfkit.data.split import load_train_eval
from rlhfkit.errors import ConfigError
from rlhfkit.losses.preference import bradley_terry, centering, margin_loss, per_prompt_pairs, plackett_luce
from rlhfkit.losses.supervision import (
    class_reward,
    ordinal_classes,
    orm_bce,
    prm_cross_entropy,
    rating_classification,
    rating_regression,
)
from rlhfkit.models import count_parameters
from rlhfkit.models.groups import (
    RECORD_KIND,
    Group,
    encode_groups,
    eval_chunks,
    forward_groups,
    group_tokens,
    group_valid,
    pool_last,
)
from rlhfkit.models.ood import OODDetector, ood_texts
from rlhfkit.models.reward import BIAS_KEY, embed, load_reward_model, save_reward_model, score
from rlhfkit.platform.distributed import full_model, gathered
from rlhfkit.platform.kernels import cpu_kernels, release_freed_memory
from rlhfkit.run import Run, check_finite, progress
from rlhfkit.train.common import (
    backward,
    micro_step,
    optimizer_step,
    prepare_model,
    prepare_training,
    quantization,
    should_save,
    start_stage,
    stop_on_nonfinite,
)


@dataclass
class RMConfig(RunArgs, OptimArgs, DataArgs, ModelArgs):
    """Train a reward model. Saved in Hugging Face AutoModelForSequenceClassification format."""

    kind: Literal["pairwise", "ranking", "rating", "orm", "prm"] = "pairwise"
    """What the labels are: preference pairs, K-way rankings, ratings, outcome labels or step labels."""
    ranking_loss: Literal["pairs", "plackett_luce"] = "pairs"
    """Ranking loss: all C(K,2) pairs of a prompt as one element (eq. 18), or Plackett-Luce (eq. 19)."""
    rating_loss: Literal["regression", "classification"] = "regression"
    """Ratings: regress on the standardised rating, or classify bad/mid/good (seed 004 §3.2)."""
    rating_low: float = 3.0
    """Classification: ratings below this are 'bad'."""
    rating_high: float = 5.0
    """Classification: ratings above this are 'good'."""
    center_coef: float = 0.0
    """Weight of the reward-centring loss mean((r_c + r_r)^2) (Eisenstein et al. 2023; 0.01 is typical)."""
    orm_rank_coef: float = 0.0
    """ORM: weight of a ranking term added to the token-level BCE: Bradley-Terry over every (correct, wrong)
    pair of solutions to the same prompt (eq. 18 with correctness as the grade). The BCE learns how
    likely a solution is right, question difficulty included; best-of-n only needs the order of one
    question's solutions, which this term trains directly."""
    share_prefix: bool = True
    """Pack each prompt once with all its responses in one row (a tree attention mask keeps them apart)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    eval_batch_size: int = 16
    """Groups per forward pass when evaluating."""
    micro_batch_tokens: int = 0
    """> 0: cut each step's groups (sorted by length) into micro-batches of at most this many padded
    tokens instead of --micro-batch-size groups (also for evaluation): bounded memory whatever the
    lengths, and short groups share a pass."""
    normalize_on: str = ""
    """After training, set the reward bias so these (prompt, response) records, e.g. reference-policy
    samples or demonstrations, score 0 on average (reference §1d). Stored as config.rlhfkit_reward_bias."""
    ood_fit: int = 512
    """After training, fit the OOD detector (Mahalanobis distance on the RM's features) on up to this many
    training responses and save it beside the model as ood.pt; RL runs then report the fraction of
    samples off this distribution (0: no detector; scalar kinds only)."""

    def resolve(self) -> RMConfig:
        if not self.train:
            raise ConfigError("rm train: --train FILE is required")
        return self


# one function per kind: (rm, groups, cfg, stats) -> (loss, metrics). Metrics are sums over the
# micro-batch with a count, so they add up exactly over micro-batches and processes.


def pairwise_loss(rm, groups, cfg, stats):
    scores, mask, _ = forward_groups(rm, groups, stats["pad_id"], cfg.share_prefix)
    r = pool_last(scores, mask).squeeze(-1).view(len(groups), 2)
    rc, rr = r[:, 0], r[:, 1]
    margins = [g.target for g in groups]
    if any(m is not None for m in margins):
        loss = margin_loss(rc, rr, torch.tensor([m or 0.0 for m in margins], device=r.device))
    else:
        loss = bradley_terry(rc, rr)
    if cfg.center_coef:
        loss = loss + cfg.center_coef * centering(rc, rr)
    d = (rc - rr).detach()
    return loss, {"accuracy": (d > 0).float().sum(), "margin": d.sum(), "reward_sum": r.detach().sum(),
                  "reward_sq": (r.detach() ** 2).sum(), "n": float(len(groups)), "n_rewards": float(r.numel())}


def ranking_loss(rm, groups, cfg, stats):
    scores, mask, k = forward_groups(rm, groups, stats["pad_id"], cfg.share_prefix)
    r = pool_last(scores, mask).squeeze(-1).view(len(groups), k)
    valid = group_valid(groups, k, r.device)
    fn = per_prompt_pairs if cfg.ranking_loss == "pairs" else plackett_luce
    loss = fn(r, valid)
    d = (r[:, 0] - r[:, 1]).detach()
    rv = r.detach()[valid]
    return loss, {"accuracy": (d > 0).float().sum(), "margin": d.sum(), "reward_sum": rv.sum(),
                  "reward_sq": (rv ** 2).sum(), "n": float(len(groups)), "n_rewards": float(rv.numel())}


def rating_loss(rm, groups, cfg, stats):
    scores, mask, _ = forward_groups(rm, groups, stats["pad_id"], False)
    out = pool_last(scores, mask)
    ratings = torch.tensor([g.target for g in groups], device=out.device)
    if cfg.rating_loss == "regression":
        target = (ratings - stats["rating_mean"]) / stats["rating_std"]
        r = out.squeeze(-1)
        loss = rating_regression(r, target)
        hit = ((r > 0) == (target > 0)).float().sum()
    else:
        classes = ordinal_classes(ratings, cfg.rating_low, cfg.rating_high)
        loss = rating_classification(out, classes)
        r = class_reward(out)
        hit = (out.argmax(-1) == classes).float().sum()
    r = r.detach()
    return loss, {"accuracy": hit, "reward_sum": r.sum(), "reward_sq": (r ** 2).sum(), "n": float(len(groups)),
                  "n_rewards": float(len(groups))}


def orm_loss(rm, groups, cfg, stats):
    scores, mask, k = forward_groups(rm, groups, stats["pad_id"], cfg.share_prefix)
    valid = group_valid(groups, k, scores.device)
    correct = torch.tensor([g.targets + [0.0] * (k - len(g.targets)) for g in groups], device=scores.device)
    loss = orm_bce(scores.squeeze(-1), correct.view(-1), mask.bool() & valid.view(-1, 1))
    final = pool_last(scores, mask).squeeze(-1).view(len(groups), k)
    if cfg.orm_rank_coef:
        loss = loss + cfg.orm_rank_coef * per_prompt_pairs(final, valid, labels=correct)
    final, correct = final.detach()[valid], correct[valid]
    return loss, {"accuracy": ((final > 0).float() == correct).float().sum(), "reward_sum": final.sum(),
                  "reward_sq": (final ** 2).sum(), "n": float(final.numel()), "n_rewards": float(final.numel())}


def prm_step_logits(rm, groups, cfg, stats) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Logits (S, 3) at every step's last token, their classes (S,), and steps per group."""
    scores, _, _ = forward_groups(rm, groups, stats["pad_id"], cfg.share_prefix)
    rows = torch.tensor([i for i, g in enumerate(groups) for _ in g.step_ends], device=scores.device)
    cols = torch.tensor([e for g in groups for e in g.step_ends], device=scores.device)
    labels = torch.tensor([c for g in groups for c in g.step_labels], device=scores.device)
    return scores[rows, cols], labels, [len(g.step_ends) for g in groups]


def prm_loss(rm, groups, cfg, stats):
    logits, labels, _ = prm_step_logits(rm, groups, cfg, stats)
    loss = prm_cross_entropy(logits, labels)
    seen = labels != -100
    hit = (logits.argmax(-1) == labels)[seen].float().sum()
    p = logits.detach().softmax(-1)[:, 2]
    return loss, {"accuracy": hit, "reward_sum": p.sum(), "reward_sq": (p ** 2).sum(), "n": float(seen.sum()),
                  "n_rewards": float(p.numel())}


LOSSES = {"pairwise": pairwise_loss, "ranking": ranking_loss, "rating": rating_loss, "orm": orm_loss, "prm": prm_loss}
NUM_LABELS = {"pairwise": 1, "ranking": 1, "rating": 1, "orm": 1, "prm": 3}


def num_labels(cfg: RMConfig) -> int:
    return 3 if cfg.kind == "rating" and cfg.rating_loss == "classification" else NUM_LABELS[cfg.kind]


def summarise(sums: dict) -> dict:
    """Turn summed statistics into means: accuracy, margin, reward mean and std."""
    n, m = max(sums.get("n", 0.0), 1.0), max(sums.get("n_rewards", 0.0), 1.0)
    mean = sums["reward_sum"] / m
    out = {"accuracy": sums["accuracy"] / n, "reward_mean": mean,
           "reward_std": max(sums["reward_sq"] / m - mean * mean, 0.0) ** 0.5}
    if "margin" in sums:
        out["margin"] = sums["margin"] / n
    return out


# ---------------------------------------------------------------------------------------------


def run(cfg: RMConfig) -> Run:
    cfg.resolve()
    accelerator, run, log = start_stage(cfg, "rm", {"train": cfg.train, "eval": cfg.eval, "model": cfg.model},
                                        accum=1 if cfg.micro_batch_tokens else None)
    with stop_on_nonfinite(run), cpu_kernels(accelerator.device, cfg.gradient_checkpointing):  # oneDNN linears on a CPU
        # 1. model and data
        rm, tokenizer = load_reward_model(cfg.model, num_labels=num_labels(cfg), seed=cfg.seed,
                                          quantization=quantization(cfg))
        records, held, loaded = load_train_eval(cfg, RECORD_KIND[cfg.kind], log)
        train_set, report = encode_groups(records, cfg.kind, tokenizer, cfg.max_length, merge=True)
        eval_set, _ = encode_groups(held, cfg.kind, tokenizer, cfg.max_length, merge=True)
        if report["truncated_prompts"] or report["truncated_responses"]:
            log(f"fitted into {cfg.max_length} tokens: {report['truncated_prompts']} prompts lost their oldest tokens, "
                f"{report['truncated_responses']} groups had responses cut at the end")
        stats = {"pad_id": tokenizer.pad_token_id}
        if cfg.kind == "rating":
            ratings = torch.tensor([g.target for g in train_set])
            stats.update(rating_mean=ratings.mean().item(), rating_std=ratings.std().clamp(min=1e-6).item())
        run.update_manifest(data={"train": report | {"skipped_malformed": loaded.skipped}, "eval_groups": len(eval_set),
                                  "train_groups": len(train_set)}, rating_stats=stats)
        rm.hf = prepare_model(rm.hf, cfg, modules_to_save=["score"])
        trainable, total = count_parameters(rm)
        log(f"reward model {cfg.model} ({cfg.kind}): {trainable:,} of {total:,} parameters trainable, "
            f"{len(train_set)} train / {len(eval_set)} eval groups")
        lengths = [group_tokens(g, cfg.share_prefix) for g in train_set]
        rm, optimizer, scheduler, plan, steps, start = prepare_training(accelerator, run, cfg, rm, len(train_set), log,
                                                                        lengths=lengths, token_budget=cfg.micro_batch_tokens)
        loss_fn = LOSSES[cfg.kind]

        # 2. the loop
        bar = progress(range(start, steps), accelerator.is_main_process and cfg.progress, f"rm {cfg.kind}", start, steps)
        for step in bar:
            micro = [[train_set[i] for i in mb] for mb in plan.micro_batches(step)]
            sums: dict[str, torch.Tensor] = {}
            step_loss = torch.zeros((), device=accelerator.device)
            for j, mb in enumerate(micro):
                with micro_step(accelerator, rm, last=j == len(micro) - 1):
                    loss, stat = loss_fn(rm, mb, cfg, stats)
                    # every group weighs the same: the micro-batch mean times its share of the batch
                    loss = loss * len(mb) / cfg.batch_size
                    check_finite(step + 1, loss=loss)
                    backward(accelerator, loss)
                step_loss += loss.detach()
                for k, v in stat.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=accelerator.device, dtype=torch.float32)
            grad_norm, lr = optimizer_step(accelerator, rm, optimizer, scheduler, cfg.max_grad_norm, step + 1)
            totals = {k: accelerator.reduce(v, "sum").item() for k, v in sums.items()}
            metrics = {"loss": accelerator.reduce(step_loss, "sum").item(), **summarise(totals), "lr": lr,
                       "grad_norm": grad_norm, "epoch": round((step + 1) / plan.steps_per_epoch, 4)}
            if eval_set and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                metrics.update({f"eval_{k}": v for k, v in evaluate(rm, eval_set, cfg, stats, accelerator).items()})
            run.log(step + 1, **metrics)
            if accelerator.is_main_process and cfg.progress:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
            if should_save(cfg, step + 1, steps):
                run.save_checkpoint(accelerator, step + 1)

        # 3. held-out evaluation and the Hugging Face model
        summary = {"steps": steps}
        if eval_set:
            summary.update({f"eval_{k}": v for k, v in evaluate(rm, eval_set, cfg, stats, accelerator).items()})
            under = " (under bf16 autocast; `rm eval` scores in fp32 by default)" if cfg.mixed_precision == "bf16" else ""
            log(f"held-out{under}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "steps"))
        # the main process (or every process, when nothing is sharded) holds the whole trained model
        unwrapped = full_model(accelerator, rm)
        detector = None
        if unwrapped is not None:
            if cfg.normalize_on:
                with accelerator.autocast():  # frozen layers may be stored in bf16
                    summary["reward_bias"] = normalize_bias(unwrapped, tokenizer, cfg)
                log(f"reward bias {summary['reward_bias']:.4f}: {cfg.normalize_on} now scores 0 on average")
            if cfg.ood_fit and num_labels(cfg) == 1 and cfg.kind != "orm" and accelerator.is_main_process:
                with accelerator.autocast():
                    detector = fit_ood(unwrapped, tokenizer, records, cfg)
                log(f"OOD detector: fitted on {detector.n_fit} training responses, threshold {detector.threshold:.1f} "
                    f"(the {detector.quantile:.0%} quantile of cross-fitted training responses)" if detector else
                    "OOD detector: too few training prompts to fit one (at least 10 are needed)")

        def save(folder):
            if accelerator.is_main_process:
                save_reward_model(unwrapped, tokenizer, folder)
                if detector is not None:
                    detector.save(Path(folder) / "ood.pt")

        run.save_final(save)
        run.finish(**summary)
        log(run.result())
        return run


def fit_ood(rm, tokenizer, records, cfg: RMConfig):
    """The OOD detector on the trained RM's features of up to ``cfg.ood_fit`` training responses (None
    with fewer than 10 training prompts: too few to cross-fit a threshold)."""
    prompts, responses, groups = ood_texts(records)
    if len(set(groups)) < 10:
        return None
    keep = sorted(random.Random(cfg.seed).sample(range(len(responses)), min(cfg.ood_fit, len(responses))))
    features = embed(rm, tokenizer, [prompts[i] for i in keep], [responses[i] for i in keep],
                     batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    return OODDetector.fit(features, groups=[groups[i] for i in keep], seed=cfg.seed)


def normalize_bias(rm, tokenizer, cfg: RMConfig) -> float:
    """score = head - bias with bias = the mean head output on ``cfg.normalize_on`` (N+ §RM:
    ``reward = head - mean(pred_reward(reference))``), so those responses average 0."""
    records = load_records(cfg.normalize_on, kind="demonstration", fields=cfg.fields).records
    setattr(rm.config, BIAS_KEY, 0.0)
    bias = sum(score(rm, tokenizer, [r.prompt for r in records], [r.response for r in records],
                     batch_size=cfg.eval_batch_size, max_length=cfg.max_length)) / len(records)
    setattr(rm.config, BIAS_KEY, bias)
    return bias


@torch.no_grad()
def evaluate(rm, groups: list[Group], cfg: RMConfig, stats: dict, accelerator) -> dict:
    """The training statistics (loss, accuracy, margin, reward mean/std) on held-out groups."""
    rm.eval()
    mine = groups[accelerator.process_index:: accelerator.num_processes]
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=accelerator.device)}
    with gathered(accelerator, rm):  # processes may hold different numbers of chunks
        for idx in eval_chunks(mine, cfg.share_prefix, cfg.micro_batch_tokens, cfg.eval_batch_size):
            chunk = [mine[i] for i in idx]
            loss, stat = LOSSES[cfg.kind](rm, chunk, cfg, stats)
            sums["loss"] += loss * len(chunk)
            for k, v in stat.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=accelerator.device, dtype=torch.float32)
            if accelerator.device.type == "cpu":
                release_freed_memory()
    rm.train()
    totals = {k: accelerator.reduce(v, "sum").item() for k, v in sums.items()}
    return {"loss": totals["loss"] / max(len(groups), 1), **summarise(totals)}
