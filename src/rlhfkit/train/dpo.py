"""Direct preference optimisation (``rlhfkit dpo``): the policy learns from preference pairs directly,
with no reward model and no sampling (Rafailov et al. 2023).

Each step::

    # 1. sequence logprobs   log pi(y) summed over response tokens (prompt masked) for chosen and
    #                        rejected; the prompt is packed once with both responses (--share-prefix)
    # 2. reference           the same with the LoRA adapter switched off (or a frozen copy), or read
    #                        from the cache computed once before training (--precompute-ref)
    # 3. loss                DPO_LOSSES[--loss](h, beta, eps) with h the log-ratio margin
    # 4. metrics             rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (TRL's names)

Records are the preference format ``rm train`` reads (prompt/chosen/rejected, HH-RLHF transcripts,
the output of ``rlhfkit label`` or ``rlhfkit bon``), encoded the same way: the prompt/response
boundary is identical for chosen and rejected by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import DataArgs, ModelArgs, OptimArgs, RunArgs
from rlhfkit.data import pad
from rlhfkit.data.split import load_train_eval
from rlhfkit.errors import ConfigError
from rlhfkit.losses.dpo import DPO_LOSSES, LENGTH_AVERAGED, implicit_rewards
from rlhfkit.models.groups import encode_groups, eval_chunks, group_tokens
from rlhfkit.models.reward import pack_shared_prefix
from rlhfkit.platform.distributed import shard_frozen
from rlhfkit.platform.kernels import cpu_kernels, release_freed_memory
from rlhfkit.rollout.phase import Reference
from rlhfkit.run import Run, check_finite, progress
from rlhfkit.train.common import (
    backward,
    micro_step,
    optimizer_step,
    prepare_training,
    save_hf,
    should_save,
    start_stage,
    stop_on_nonfinite,
)
from rlhfkit.train.rl import load_policy, plot_curves


@dataclass
class DPOConfig(RunArgs, OptimArgs, DataArgs, ModelArgs):
    """DPO and its variants on preference pairs, against a frozen reference."""

    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"] = "sigmoid"
    """The variant (losses/dpo.py)."""
    beta: float = 0.1
    """Strength of the KL tether (the implicit reward's scale)."""
    label_smoothing: float = 0.0
    """eps of cdpo / robust: the assumed rate of flipped labels."""
    precompute_ref: bool = False
    """Compute the reference logprobs of every pair once before training and cache them in the run directory."""
    reference: str = ""
    """Reference model ('': the policy's starting weights: LoRA adapter off, or a frozen copy)."""
    share_prefix: bool = True
    """Pack each prompt once with chosen and rejected (a tree attention mask keeps them apart)."""
    micro_batch_tokens: int = 0
    """> 0: micro-batches cut by padded tokens instead of --micro-batch-size pairs."""
    eval_batch_size: int = 8
    """Pairs per forward pass when evaluating."""
    lr: float = 1e-6
    """Peak learning rate (full fine-tuning; 5e-6 to 5e-5 with LoRA)."""
    batch_size: int = 16
    """Pairs per optimiser step."""
    micro_batch_size: int = 4
    """Pairs per forward pass."""

    def resolve(self) -> DPOConfig:
        if not self.train:
            raise ConfigError("dpo: --train PAIRS is required")
        return self


def sequence_logprobs(model, groups, pad_id: int, share_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y | x) summed over each response's tokens, and their counts: (N,), (N,) with
    N = 2 * len(groups) in the order chosen_0, rejected_0, chosen_1, ...

    Token t of a response is predicted from the position before it in its own branch: the last
    prompt token for t = 0, then the response's own previous token (reference §8 item 10). Only
    those positions go through the log-softmax."""
    device = next(model.parameters()).device
    prompts = [g.prompt for g in groups]
    if share_prefix:
        ids, mask, pos, starts = pack_shared_prefix(prompts, [g.responses for g in groups], pad_id)
        rows = [(b, starts[b][k]) for b in range(len(groups)) for k in range(len(groups[b].responses))]
    else:
        seqs = [g.prompt + r for g in groups for r in g.responses]
        ids = pad(seqs, pad_id, "right")
        mask = pad([[1] * len(s) for s in seqs], 0, "right")
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [(i, len(groups[i // 2].prompt)) for i in range(len(seqs))]
    row_idx, pred_idx, tgt_idx, owner = [], [], [], []
    for n, (row, start) in enumerate(rows):
        plen, length = len(groups[n // 2].prompt), len(groups[n // 2].responses[n % 2])
        row_idx += [row] * length
        tgt_idx += range(start, start + length)
        pred_idx += [plen - 1] + list(range(start, start + length - 1))
        owner += [n] * length
    row_idx, pred_idx, tgt_idx = (torch.tensor(x, device=device) for x in (row_idx, pred_idx, tgt_idx))
    hidden_logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                          use_cache=False).logits
    logits = hidden_logits[row_idx, pred_idx].float()
    ids = ids.to(device)
    logp = logits.gather(-1, ids[row_idx, tgt_idx][:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    owner = torch.tensor(owner, device=device)
    sums = torch.zeros(len(rows), device=device, dtype=logp.dtype).index_add(0, owner, logp)
    counts = torch.zeros(len(rows), device=device).index_add(0, owner, torch.ones_like(logp))
    return sums, counts


def margins(logp: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, length_averaged: bool) -> torch.Tensor:
    """h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)] per pair, from (2P,) logprobs
    (chosen, rejected interleaved); per-token averages for the length-averaged variants (IPO)."""
    ratio = (logp - ref) / counts if length_averaged else logp - ref
    return ratio[0::2] - ratio[1::2]


def pair_loss(model, groups, ref: torch.Tensor, cfg: DPOConfig, pad_id: int) -> tuple[torch.Tensor, dict]:
    """Sum over the pairs of the variant's loss, and TRL's implicit-reward statistics as sums."""
    logp, counts = sequence_logprobs(model, groups, pad_id, cfg.share_prefix)
    h = margins(logp, ref, counts, cfg.loss in LENGTH_AVERAGED)
    loss = DPO_LOSSES[cfg.loss](h, cfg.beta, cfg.label_smoothing).sum()
    stats = {k: v * len(groups) for k, v in implicit_rewards(logp[0::2], ref[0::2], logp[1::2], ref[1::2], cfg.beta).items()}
    stats["logps/chosen"], stats["logps/rejected"] = logp[0::2].detach().sum(), logp[1::2].detach().sum()
    return loss, stats


@torch.no_grad()
def reference_logprobs(policy, reference: Reference, groups, pad_id: int, share_prefix: bool) -> torch.Tensor:
    ctx, model = reference.model(policy)
    with ctx:
        return sequence_logprobs(model, groups, pad_id, share_prefix)[0]


@torch.no_grad()
def evaluate(model, reference, groups, cfg: DPOConfig, pad_id: int, accelerator, ref_cache: dict) -> dict:
    """Held-out loss and implicit-reward statistics (rewards/accuracies is the held-out preference accuracy).
    The frozen reference's logprobs of each held-out chunk are computed on the first call and kept in
    ``ref_cache`` for the later ones."""
    model.eval()
    policy = accelerator.unwrap_model(model)
    sums: dict = {}
    for idx in eval_chunks(groups, cfg.share_prefix, cfg.micro_batch_tokens, cfg.eval_batch_size):
        chunk = [groups[i] for i in idx]
        key = tuple(idx)
        if key not in ref_cache:
            ref_cache[key] = reference_logprobs(policy, reference, chunk, pad_id, cfg.share_prefix)
        loss, stats = pair_loss(policy, chunk, ref_cache[key], cfg, pad_id)
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if accelerator.device.type == "cpu":
            release_freed_memory()
    model.train()
    return {k: v / max(len(groups), 1) for k, v in sums.items()}


def run(cfg: DPOConfig) -> Run:
    cfg.resolve()
    accelerator, run, log = start_stage(cfg, "dpo", {"train": cfg.train, "eval": cfg.eval, "model": cfg.model},
                                        accum=1 if cfg.micro_batch_tokens else None)
    with stop_on_nonfinite(run), cpu_kernels(accelerator.device, cfg.gradient_checkpointing):  # oneDNN linears on a CPU
        # 0. policy, reference, pairs
        policy, tokenizer = load_policy(cfg)
        reference = Reference(policy, cfg.mixed_precision, cfg.reference)
        pad_id = tokenizer.pad_token_id
        records, held, loaded = load_train_eval(cfg, "preference", log)
        train_set, report = encode_groups(records, "pairwise", tokenizer, cfg.max_length)
        eval_set, _ = encode_groups(held, "pairwise", tokenizer, cfg.max_length)
        run.update_manifest(data={"train": report | {"skipped_malformed": loaded.skipped}, "eval_pairs": len(eval_set)})
        lengths = [group_tokens(g, cfg.share_prefix) for g in train_set]
        model, optimizer, scheduler, plan, steps, start = prepare_training(
            accelerator, run, cfg, policy, len(train_set), log, lengths=lengths, token_budget=cfg.micro_batch_tokens)
        reference.to(accelerator.device)
        if reference.copy is not None:  # a separate reference: sharded as the policy is
            shard_frozen(accelerator, reference.copy, "the reference", log)
        inner = accelerator.unwrap_model(model)
        log(f"dpo ({cfg.loss}, beta {cfg.beta}): policy {cfg.model}, reference "
            f"{cfg.reference or ('adapter off' if reference.copy is None else 'frozen copy')}; "
            f"{len(train_set)} train / {len(eval_set)} held-out pairs")

        cached, eval_ref = None, {}
        if cfg.precompute_ref:  # 2. (once) the reference's logprobs of every training pair, cached in the run
            path = run.path / "reference_logps.pt"
            if path.is_file():
                cached = torch.load(path)
            else:
                cached = torch.zeros(len(train_set), 2)
                with accelerator.autocast():
                    for idx in eval_chunks(train_set, cfg.share_prefix, cfg.micro_batch_tokens, cfg.eval_batch_size):
                        ref = reference_logprobs(inner, reference, [train_set[i] for i in idx], pad_id, cfg.share_prefix)
                        cached[idx] = ref.view(-1, 2).float().cpu()
                if accelerator.is_main_process:
                    torch.save(cached, path)
        if not start and eval_set:
            with accelerator.autocast():
                before = evaluate(model, reference, eval_set, cfg, pad_id, accelerator, eval_ref)
            run.log(0, **{f"eval_{k}": v for k, v in before.items()})
            log(f"step 0: held-out loss {before['loss']:.4f}, rewards/accuracies {before['rewards/accuracies']:.3f}")

        bar = progress(range(start, steps), accelerator.is_main_process and cfg.progress, f"dpo {cfg.loss}", start, steps)
        for step in bar:
            micro = plan.micro_batches(step)
            sums: dict = {}
            for j, idx in enumerate(micro):
                groups = [train_set[i] for i in idx]
                with micro_step(accelerator, model, last=j == len(micro) - 1):
                    with accelerator.autocast():
                        # 2. reference logprobs (cached, or the adapter switched off)
                        if cached is not None:
                            ref = cached[idx].reshape(-1).to(accelerator.device)
                        else:
                            ref = reference_logprobs(inner, reference, groups, pad_id, cfg.share_prefix)
                        # 1. + 3. policy logprobs and the loss, each pair weighing 1 / batch_size
                        loss, stats = pair_loss(model, groups, ref, cfg, pad_id)
                    loss = loss / cfg.batch_size
                    check_finite(step + 1, loss=loss)
                    backward(accelerator, loss)
                sums["loss"] = sums.get("loss", 0.0) + loss.detach()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
            grad_norm, lr = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step + 1)
            # 4. metrics: TRL's names, means over the step's pairs
            totals = {k: accelerator.reduce(torch.as_tensor(v, device=accelerator.device), "sum").item()
                      for k, v in sums.items()}
            metrics = {"loss": totals.pop("loss"), **{k: v / cfg.batch_size for k, v in totals.items()},
                       "lr": lr, "grad_norm": grad_norm, "epoch": round((step + 1) / plan.steps_per_epoch, 4)}
            if eval_set and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                with accelerator.autocast():
                    metrics.update({f"eval_{k}": v for k, v in evaluate(model, reference, eval_set, cfg, pad_id,
                                                                       accelerator, eval_ref).items()})
            run.log(step + 1, **metrics)
            if accelerator.is_main_process and cfg.progress:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if should_save(cfg, step + 1, steps):
                run.save_checkpoint(accelerator, step + 1)

        summary = {"steps": steps}
        if eval_set:
            with accelerator.autocast():
                after = evaluate(model, reference, eval_set, cfg, pad_id, accelerator, eval_ref)
            summary.update({f"eval_{k}": v for k, v in after.items()})
            if not (cfg.eval_every and steps % cfg.eval_every == 0):  # the curves' last eval point
                run.log(steps, **{f"eval_{k}": v for k, v in after.items()})
            log(f"held-out after training: loss {after['loss']:.4f}, rewards/accuracies {after['rewards/accuracies']:.3f}, "
                f"margins {after['rewards/margins']:.4f}")
        if accelerator.is_main_process and plot_curves(run.path / "metrics.jsonl", run.path / "curves.png", CURVES,
                                                       run.path.name):
            log(f"curves: {run.path / 'curves.png'}")
        run.save_final(lambda folder: save_hf(accelerator, model, tokenizer, folder))
        run.finish(**summary)
        log(run.result())
        return run


CURVES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "eval_loss",
          "eval_rewards/accuracies", "eval_rewards/margins"]
