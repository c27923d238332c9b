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

from rlhfkit.config import DataArgs, ModelArgs, RunArgs, print_config
from rlhfkit.errors import ConfigError
from rlhfkit.losses.kl import best_of_n_kl
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
    print_config(cfg)
    run = Run.open(cfg, "bon", inputs={"train": cfg.train, "model": cfg.model})
    engine, tokenizer = load_engine(cfg.rollout, cfg.model, seed=cfg.seed)
    reward = reward_from(cfg, cfg.reward, engine.device)
    prompts = prompts_from(cfg, tokenizer)
    records = prompts.records
    first, best, worst = [], [], []
    files = {name: open(run.path / f"{name}.jsonl", "w") for name in ("samples", "best", "pairs")}
    try:
        for start in progress(range(0, len(records), cfg.batch_size), cfg.progress, f"best-of-{cfg.n}"):
            idx = list(range(start, min(start + cfg.batch_size, len(records))))
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
            batch = rollout_phase(engine, tokenizer, reward, prompts, idx, cfg.n, cfg, g)
            scores = batch.scores.view(len(idx), cfg.n)
            hi, lo = best_of(scores)
            for j, i in enumerate(idx):
                rec, texts = records[i], batch.texts[j * cfg.n: (j + 1) * cfg.n]
                for s, (text, score) in enumerate(zip(texts, scores[j].tolist())):
                    files["samples"].write(json.dumps({"prompt": rec.prompt, "response": text, "score": score,
                                                       "sample": s, "source": rec.source}) + "\n")
                files["best"].write(json.dumps({"prompt": rec.prompt, "response": texts[hi[j]],
                                                "score": scores[j, hi[j]].item()}) + "\n")
                if scores[j, hi[j]] > scores[j, lo[j]]:  # a tie says nothing about preference
                    files["pairs"].write(json.dumps({"prompt": rec.prompt, "chosen": texts[hi[j]],
                                                     "rejected": texts[lo[j]]}) + "\n")
            first += scores[:, 0].tolist()
            best += scores.max(1).values.tolist()
            worst += scores.min(1).values.tolist()
    finally:
        for f in files.values():
            f.close()
    summary = {"prompts": len(records), "n": cfg.n, "mean_score_n1": sum(first) / len(first),
               "mean_score_best": sum(best) / len(best), "mean_score_worst": sum(worst) / len(worst),
               "kl_bon": best_of_n_kl(cfg.n)}
    run.finish(**summary)
    print(f"best-of-{cfg.n} on {len(records)} prompts: mean score {summary['mean_score_best']:.4f} "
          f"(one sample: {summary['mean_score_n1']:.4f}) at KL_bon = log n - (n-1)/n = {summary['kl_bon']:.4f}\n"
          f"SFT data: {run.path / 'best.jsonl'}; preference pairs: {run.path / 'pairs.jsonl'}")
    return run
