"""AI feedback (``rlhfkit label``): sample k responses per prompt from a policy and label them with a
judge, a reward model or a rule, writing a preference dataset in the format human labels use
(Bai et al. 2022, *Constitutional AI*; Lee et al. 2023, *RLAIF*, arXiv 2309.00267).

* ``--labeler reward``: every response is scored by ``--reward`` (a reward model, ``rule:FILE.yaml``,
  an HTTP scorer or a weighted sum); pairs are (best, worst) of each prompt, or every pair with
  different scores (``--pairs all``), each with its score margin.
* ``--labeler judge``: each pair is judged in both orders by a local model or an OpenAI-compatible
  endpoint; only position-consistent wins become pairs, ties are counted and dropped.
* ``--labeler simulated``: a simulated annotator with a hidden utility ``--utility`` (any reward spec,
  usually a rule) that chooses like a noisy person, by the Bradley-Terry model:
  P(a preferred to b) = sigmoid((u(a) - u(b)) / noise). Only the choice is written, never the
  utility, so a reward model trained on it learns a proxy of a gold metric it never sees.

The run directory holds ``preferences.jsonl`` (prompt / chosen / rejected [/ margin]), which
``rlhfkit rm train`` and ``rlhfkit dpo`` read as they are, ``samples.jsonl`` and the label
statistics in the manifest: pairs written, ties, and the judge's position-consistency rate.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import DataArgs, ModelArgs, RunArgs, announce
from rlhfkit.errors import ConfigError
from rlhfkit.feedback.judge import judge_pairs, make_judge
from rlhfkit.rollout.engine import load_engine
from rlhfkit.rollout.phase import SamplingArgs, prompts_from, rollout_phase
from rlhfkit.rollout.rewards import RewardSource, reward_from
from rlhfkit.run import Run, progress


@dataclass
class LabelConfig(RunArgs, DataArgs, ModelArgs, SamplingArgs):
    """Sample k responses per prompt and label preference pairs with a judge, a reward model or a rule."""

    k: int = 2
    """Responses sampled per prompt."""
    labeler: Literal["reward", "judge", "simulated"] = "reward"
    """Who labels: --reward (RM, rule, HTTP), an LLM judge (--judge-model / --judge-url), or a simulated
    noisy annotator with the hidden utility --utility."""
    utility: str = ""
    """The simulated annotator's hidden utility (same syntax as --reward)."""
    noise: float = 0.1
    """The simulated annotator's Bradley-Terry temperature: P(a > b) = sigmoid((u_a - u_b) / noise);
    larger is noisier."""
    pairs: Literal["best_worst", "all"] = "best_worst"
    """With a reward: the best and worst response of each prompt, or every pair of different scores.
    (The judge and the simulated annotator are shown every pair.)"""
    judge_model: str = "smollm2-135m-instruct"
    """Local judge model for --labeler judge."""
    judge_url: str = ""
    """OpenAI-compatible judge endpoint instead of a local model."""
    judge_max_new_tokens: int = 256
    """Longest judge answer."""
    batch_size: int = 8
    """Prompts per sampling batch."""

    def resolve(self) -> LabelConfig:
        if not self.train:
            raise ConfigError("label: --train PROMPTS is required")
        if self.labeler == "reward" and not self.reward:
            raise ConfigError("label: --labeler reward needs --reward (a reward model, rule:FILE.yaml or a URL)")
        if self.labeler == "simulated" and not self.utility:
            raise ConfigError("label: --labeler simulated needs --utility (the annotator's hidden utility, "
                              "e.g. rule:FILE.yaml)")
        if self.k < 2:
            raise ConfigError("label: --k must be at least 2 to make pairs")
        return self


def reward_pairs(scores: list[float], mode: str) -> list[tuple[int, int, float]]:
    """(chosen, rejected, margin) index pairs of one prompt's responses from their scores. Equal scores
    make no pair (a tie says nothing about preference).

    >>> reward_pairs([0.1, 0.9, 0.5], "best_worst")
    [(1, 0, 0.8)]
    """
    if mode == "best_worst":
        hi = max(range(len(scores)), key=scores.__getitem__)
        lo = min(range(len(scores)), key=scores.__getitem__)
        return [(hi, lo, round(scores[hi] - scores[lo], 6))] if scores[hi] > scores[lo] else []
    out = []
    for i, j in itertools.combinations(range(len(scores)), 2):
        if scores[i] != scores[j]:
            a, b = (i, j) if scores[i] > scores[j] else (j, i)
            out.append((a, b, round(scores[a] - scores[b], 6)))
    return out


def simulated_choice(u_a: float, u_b: float, noise: float, rng: random.Random) -> bool:
    """True when a Bradley-Terry annotator with utilities (u_a, u_b) and temperature ``noise`` prefers a:
    P(a) = sigmoid((u_a - u_b) / noise). Equal utilities are a coin flip."""
    return rng.random() < 1.0 / (1.0 + math.exp(-(u_a - u_b) / max(noise, 1e-12)))


class Unscored(RewardSource):
    """Sampling only: a judge labels the pairs afterwards."""

    name = "none"

    def score(self, prompts, responses, meta=None) -> list[float]:
        return [0.0] * len(responses)


def run(cfg: LabelConfig) -> Run:
    cfg.resolve()
    run = Run.open(cfg, "label", inputs={"train": cfg.train, "model": cfg.model})
    announce(cfg, "label", run.path)
    engine, tokenizer = load_engine(cfg.rollout, cfg.model, seed=cfg.seed)
    prompts = prompts_from(cfg, tokenizer)
    records = prompts.records
    judge = None
    if cfg.labeler != "judge":
        reward = reward_from(cfg, cfg.reward if cfg.labeler == "reward" else cfg.utility, engine.device)
    else:
        reward = Unscored()
        judge = make_judge(cfg.judge_model, cfg.judge_url, "", cfg.judge_max_new_tokens, cfg.batch_size, cfg.rollout)

    stats = {"prompts": len(records), "k": cfg.k, "pairs": 0, "ties": 0, "judged": 0, "consistent": 0, "unparsable": 0,
             "agree_with_utility": 0, "utility_differs": 0}
    with open(run.path / "preferences.jsonl", "w") as prefs, open(run.path / "samples.jsonl", "w") as samples:
        for start in progress(range(0, len(records), cfg.batch_size), cfg.progress, "label"):
            idx = list(range(start, min(start + cfg.batch_size, len(records))))
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
            batch = rollout_phase(engine, tokenizer, reward, prompts, idx, cfg.k, cfg, g)
            for j, i in enumerate(idx):
                texts = batch.texts[j * cfg.k: (j + 1) * cfg.k]
                scores = batch.scores[j * cfg.k: (j + 1) * cfg.k].tolist()
                for s, (t, sc) in enumerate(zip(texts, scores)):
                    samples.write(json.dumps({"prompt": records[i].prompt, "response": t, "sample": s,
                                              **({"score": sc} if cfg.labeler == "reward" else {})}) + "\n")
                if cfg.labeler == "simulated":
                    rng = random.Random(cfg.seed * 1_000_003 + i)
                    combos = list(itertools.combinations(range(len(texts)), 2))  # each pair shown once
                    rows = []
                    for a, b in combos:
                        first = simulated_choice(scores[a], scores[b], cfg.noise, rng)
                        win, lose = (a, b) if first else (b, a)
                        if scores[a] != scores[b]:
                            stats["utility_differs"] += 1
                            stats["agree_with_utility"] += scores[win] > scores[lose]
                        rows.append({"prompt": records[i].prompt, "chosen": texts[win], "rejected": texts[lose]})
                elif judge is None:
                    found = reward_pairs(scores, cfg.pairs)
                    stats["ties"] += (len(texts) * (len(texts) - 1) // 2 if cfg.pairs == "all" else 1) - len(found)
                    rows = [{"prompt": records[i].prompt, "chosen": texts[a], "rejected": texts[b], "margin": m}
                            for a, b, m in found]
                else:
                    combos = list(itertools.combinations(range(len(texts)), 2))
                    out = judge_pairs(judge, [records[i].prompt] * len(combos), [texts[a] for a, _ in combos],
                                      [texts[b] for _, b in combos])
                    stats["judged"] += out["n"]
                    stats["consistent"] += round(out["consistency"] * out["n"])
                    stats["unparsable"] += out["unparsable"]
                    stats["ties"] += out["ties"]
                    rows = [{"prompt": records[i].prompt, "chosen": texts[a] if res == "x" else texts[b],
                             "rejected": texts[b] if res == "x" else texts[a]}
                            for (a, b), res in zip(combos, out["results"]) if res != "tie"]
                for row in rows:
                    prefs.write(json.dumps(row) + "\n")
                stats["pairs"] += len(rows)
    if cfg.labeler == "simulated":
        stats["agreement_with_utility"] = stats["agree_with_utility"] / max(stats["utility_differs"], 1)
    if judge is not None:
        stats["position_consistency"] = stats["consistent"] / max(stats["judged"], 1)
    run.finish(**stats)
    print(json.dumps(stats, indent=2) + f"\npreference data: {run.path / 'preferences.jsonl'}")
    return run
