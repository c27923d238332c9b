"""Best-of-n sampling (``rlhfkit bon``): sample n responses per prompt, keep the one the reward likes best.

Used two ways (Stiennon et al. 2020; Nakano et al. 2021; Gao et al. 2022):

* **as a policy**: no training; its KL to the sampling policy is KL_bon = log n - (n-1)/n, so its
  reward gain can be placed on the same reward-vs-KL frontier as PPO's;
* **as data** for rejection-sampling fine-tuning: ``best.jsonl`` holds (prompt, best response)
  demonstrations that ``rlhfkit sft`` reads as they are; ``pairs.jsonl`` holds (best, worst)
  preference pairs that ``rlhfkit rm train`` and ``rlhfkit dpo`` read.

The run directory also has ``samples.jsonl`` (every sample with its score) and, in the manifest,
the mean score of a single sample (n = 1) against the mean of the best, with KL_bon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from accelerate import PartialState

from rlhfkit.config import DataArgs, ModelArgs, RunArgs, announce
from rlhfkit.errors import ConfigError
from rlhfkit.losses.kl import best_of_n_kl
from rlhfkit.platform.placement import cpu_launch
from rlhfkit.rollout.engine import load_engine
from rlhfkit.rollout.phase import SamplingArgs, prompts_from, rollout_phase
from rlhfkit.rollout.rewards import reward_from
from rlhfkit.run import Run, progress


@dataclass
class BoNConfig(RunArgs, DataArgs, ModelArgs, SamplingArgs):
    """Best-of-n: sample n responses per prompt and keep the best by reward (a policy, and SFT data)."""

    n: int = 4
    """Samples per prompt."""
    batch_size: int = 8
    """Prompts per sampling batch (each gives n sequences)."""

    def resolve(self) -> BoNConfig:
        if not self.train or not self.reward:
            raise ConfigError("bon: --train PROMPTS and --reward are required")
        if self.n < 2:
            raise ConfigError("bon: --n must be at least 2")
        return self


def best_of(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the best and worst sample of each prompt: (P, n) -> (P,), (P,). Ties go to the first."""
    return scores.argmax(1), scores.argmin(1)


def run(cfg: BoNConfig) -> Run:
    cfg.resolve()
    state = PartialState(cpu=cpu_launch())  # under accelerate launch: the prompts' batches are dealt out
    main = state.is_main_process
    run = Run.open(cfg, "bon", inputs={"train": cfg.train, "model": cfg.model}, is_main=main)
    if main:
        announce(cfg, "bon", run.path)
    engine, tokenizer = load_engine(cfg.rollout, cfg.model, seed=cfg.seed)
    reward = reward_from(cfg, cfg.reward, engine.device)
    prompts = prompts_from(cfg, tokenizer)
    records = prompts.records
    starts = range(0, len(records), cfg.batch_size)
    part = run.path / f".bon-part-{state.process_index}.jsonl"  # this process's batches, merged below
    with open(part, "w") as out:
        for start in progress(starts[state.process_index:: state.num_processes], main and cfg.progress,
                              f"best-of-{cfg.n}"):
            idx = list(range(start, min(start + cfg.batch_size, len(records))))
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
            batch = rollout_phase(engine, tokenizer, reward, prompts, idx, cfg.n, cfg, g)
            out.write(json.dumps({"start": start, **best_of_batch([records[i] for i in idx], batch.texts,
                                                                   batch.scores.view(len(idx), cfg.n))}) + "\n")
    state.wait_for_everyone()
    if main:
        summary = merge_parts(run.path, state.num_processes, len(records), cfg.n)
        run.finish(**summary)
        print(f"best-of-{cfg.n} on {len(records)} prompts: mean score {summary['mean_score_best']:.4f} "
              f"(one sample: {summary['mean_score_n1']:.4f}) at KL_bon = log n - (n-1)/n = {summary['kl_bon']:.4f}\n"
              f"SFT data: {run.path / 'best.jsonl'}; preference pairs: {run.path / 'pairs.jsonl'}")
    state.wait_for_everyone()
    return run


def best_of_batch(records, texts: list[str], scores: torch.Tensor) -> dict:
    """The lines of samples.jsonl, best.jsonl and pairs.jsonl for one batch of prompts, and its scores."""
    n = scores.shape[1]
    hi, lo = best_of(scores)
    lines: dict = {"samples": [], "best": [], "pairs": []}
    for j, rec in enumerate(records):
        mine = texts[j * n: (j + 1) * n]
        for s, (text, score) in enumerate(zip(mine, scores[j].tolist())):
            lines["samples"].append({"prompt": rec.prompt, "response": text, "score": score, "sample": s,
                                     "source": rec.source})
        lines["best"].append({"prompt": rec.prompt, "response": mine[hi[j]], "score": scores[j, hi[j]].item()})
        if scores[j, hi[j]] > scores[j, lo[j]]:  # a tie says nothing about preference
            lines["pairs"].append({"prompt": rec.prompt, "chosen": mine[hi[j]], "rejected": mine[lo[j]]})
    return {**lines, "first": scores[:, 0].tolist(), "top": scores.max(1).values.tolist(),
            "bottom": scores.min(1).values.tolist()}


def merge_parts(folder, parts: int, prompts: int, n: int) -> dict:
    """samples.jsonl, best.jsonl and pairs.jsonl in prompt order from every process's part; the summary."""
    batches = []
    for rank in range(parts):
        path = folder / f".bon-part-{rank}.jsonl"
        batches += [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
    batches.sort(key=lambda b: b["start"])
    for name in ("samples", "best", "pairs"):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for b in batches for row in b[name])
    first, top, bottom = ([x for b in batches for x in b[key]] for key in ("first", "top", "bottom"))
    return {"prompts": prompts, "n": n, "mean_score_n1": sum(first) / len(first),
            "mean_score_best": sum(top) / len(top), "mean_score_worst": sum(bottom) / len(bottom),
            "kl_bon": best_of_n_kl(n)}
