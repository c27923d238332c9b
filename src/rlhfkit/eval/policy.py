"""Policy evaluation on held-out prompts (``rlhfkit eval policy``), also run at the end of every RL stage.

For each held-out prompt, one response from the policy and one from the reference, sampled with the
same seed. Then:

* the mean reward of each by the proxy (the RM) and, where there is one, by the gold metric, with the
  paired difference and its standard error, and the win rate (ties count half);
* the KL of the policy to the reference: sum over response tokens of log pi - log pi_ref on the
  policy's own samples (k1, an unbiased estimate of KL(pi || pi_ref) per response);
* the win rate by an LLM judge, each pair judged in both orders (a win only if consistent);
* response length (words) and distinct-n diversity of each side;
* a table of samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from rlhfkit.config import DataArgs, ModelArgs, RunArgs, announce
from rlhfkit.data import load_records
from rlhfkit.data.split import load_train_eval
from rlhfkit.errors import ConfigError
from rlhfkit.eval.metrics import sample_stats
from rlhfkit.eval.report import write_report
from rlhfkit.feedback.judge import judge_pairs, make_judge
from rlhfkit.losses.kl import kl_penalty
from rlhfkit.platform.placement import make_accelerator, precision_text, resolve_precision
from rlhfkit.rollout.engine import RolloutEngine, load_engine
from rlhfkit.rollout.phase import (
    Prompts,
    Reference,
    SamplingArgs,
    decode,
    encode_prompts,
    sampling_params,
    score_texts,
)
from rlhfkit.rollout.rewards import reward_from
from rlhfkit.rollout.sampler import response_logprobs
from rlhfkit.run import Run


def paired(xs: list[float], ys: list[float]) -> dict:
    """Means of x and y, their paired difference with its standard error, and the win rate of x
    (ties half).

    >>> r = paired([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]); (r["difference"], round(r["difference_se"], 4), r["win_rate"])
    (1.0, 0.5774, 0.8333333333333334)
    """
    n = len(xs)
    diff = [a - b for a, b in zip(xs, ys)]
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / max(n - 1, 1) / n)
    wins = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diff)
    return {"policy": sum(xs) / n, "reference": sum(ys) / n, "difference": mean, "difference_se": se,
            "difference_in_se": mean / se if se > 0 else (0.0 if mean == 0 else math.inf), "win_rate": wins / n}


@torch.no_grad()
def compare_policies(engine: RolloutEngine, ref_engine: RolloutEngine, policy, reference: Reference, tokenizer,
                     rewards: dict, held: Prompts, cfg, seed: int, batch_size: int = 16, judge=None) -> dict:
    """Policy against reference on ``held`` (see the module docstring): ``engine`` samples the policy and
    ``ref_engine`` the reference; ``policy`` and ``reference`` give the teacher-forced logprobs of
    the KL. ``rewards`` maps a name ('reward', 'gold') to a reward source."""
    temperature = cfg.temperature if cfg.eval_temperature < 0 else cfg.eval_temperature
    params = sampling_params(cfg, tokenizer, temperature)
    scores = {name: {"policy": [], "reference": []} for name in rewards}
    texts: dict[str, list[str]] = {"policy": [], "reference": []}
    kl: list[float] = []
    for start in range(0, len(held.ids), batch_size):
        ids, records = held.ids[start: start + batch_size], held.records[start: start + batch_size]
        rollouts = {"policy": engine.generate(ids, params, torch.Generator().manual_seed(seed + start)),
                    "reference": ref_engine.generate(ids, params, torch.Generator().manual_seed(seed + start))}
        for side, ro in rollouts.items():
            text = decode(tokenizer, ro)
            texts[side] += text
            for name, reward in rewards.items():
                scores[name][side] += score_texts(reward, records, text, ro, cfg.missing_eos_penalty)[0].tolist()
        step = getattr(cfg, "micro_batch_size", batch_size)  # the trainer's micro-batch bounds the logits' memory
        for i in range(0, len(ids), step):
            pol = rollouts["policy"].select(slice(i, i + step))
            logp = response_logprobs(policy, pol, temperature)
            ref_logp = reference.logprobs(policy, pol, temperature)
            kl += (kl_penalty(logp, ref_logp, "k1") * pol.response_mask).sum(-1).tolist()
    n = len(kl)
    result = {"prompts": n, "temperature": temperature,
              "kl": sum(kl) / n, "kl_se": paired(kl, [0.0] * n)["difference_se"],
              "rewards": {name: paired(s["policy"], s["reference"]) for name, s in scores.items()},
              "policy_stats": sample_stats(texts["policy"]), "reference_stats": sample_stats(texts["reference"])}
    if judge is not None:
        out = judge_pairs(judge, [r.prompt for r in held.records], texts["policy"], texts["reference"])
        wins = sum(1.0 if r == "x" else 0.5 if r == "tie" else 0.0 for r in out["results"])
        result["judge"] = {"win_rate": wins / n, "consistency": out["consistency"], "ties": out["ties"],
                           "unparsable": out["unparsable"]}
    first = next(iter(result["rewards"].values()), None)
    if first is not None:  # the headline numbers, flat: the optimised reward
        result.update(policy_score=first["policy"], reference_score=first["reference"],
                      difference=first["difference"], difference_se=first["difference_se"],
                      difference_in_se=first["difference_in_se"])
    result["samples"] = [{"prompt": r.prompt[-1]["content"], "policy": p, "reference": q,
                          **{f"{name}_{side}": scores[name][side][i] for name in rewards for side in ("policy", "reference")}}
                         for i, (r, p, q) in enumerate(zip(held.records, texts["policy"], texts["reference"]))]
    if judge is not None:  # each prompt's verdict, for comparing the judge with people (annotate ab)
        for sample, verdict in zip(result["samples"], out["results"]):
            sample["judge"] = {"x": "policy", "y": "reference"}.get(verdict, verdict)
    return result


def summary_line(result: dict) -> str:
    parts = [f"{name}: policy {r['policy']:.4f} vs reference {r['reference']:.4f}, difference "
             f"{r['difference']:+.4f} ± {r['difference_se']:.4f} SE ({r['difference_in_se']:.1f} SE), win rate "
             f"{r['win_rate']:.3f}" for name, r in result["rewards"].items()]
    judge = f"; judge win rate {result['judge']['win_rate']:.3f}" if "judge" in result else ""
    return (f"held-out ({result['prompts']} prompts, T={result['temperature']}): " + "; ".join(parts) +
            f"; KL {result['kl']:.3f} ± {result['kl_se']:.3f}{judge}")


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class EvalPolicyConfig(RunArgs, DataArgs, ModelArgs, SamplingArgs):
    """Evaluate a policy against its reference on held-out prompts: reward, gold, KL, win rates,
    length and diversity, a sample table; writes eval.json and report.html."""

    reference: str = "smollm2-135m-instruct"
    """The reference policy (the model RL started from)."""
    gold: str = ""
    """A gold metric (same syntax as --reward), e.g. the simulated annotator's hidden utility."""
    judge_model: str = ""
    """An LLM judge for a win rate with order swapped (a local model; '' for none)."""
    judge_url: str = ""
    """Or an OpenAI-compatible judge endpoint."""
    eval_size: float = 0
    """With --train only: evaluate on the records held out by this split (as the RL stage did)."""


    def resolve(self) -> EvalPolicyConfig:
        if not (self.train or self.eval):
            raise ConfigError("eval policy: --eval PROMPTS (or --train with --eval-size) is required")
        if not (self.reward or self.gold):
            raise ConfigError("eval policy: --reward or --gold is required")
        return self


def run(cfg: EvalPolicyConfig) -> Run:
    cfg.resolve()
    cfg.mixed_precision, why = resolve_precision(cfg.mixed_precision)
    run = Run.open(cfg, "eval-policy", inputs={"model": cfg.model, "reference": cfg.reference, "eval": cfg.eval,
                                               "train": cfg.train})
    announce(cfg, "eval policy", run.path, precision_text(cfg.mixed_precision, why))
    accelerator = make_accelerator(cfg)  # the autocast; the engines own the device
    engine, tokenizer = load_engine(cfg.rollout, cfg.model, accelerator.device, seed=cfg.seed)
    policy = engine.model
    reference = Reference(policy, cfg.mixed_precision, cfg.reference).to(accelerator.device)
    if cfg.train:
        train, held, _ = load_train_eval(cfg, "prompt", print)
        records = held or train
    else:
        records = load_records(cfg.eval, kind="prompt", fields=cfg.fields, on_bad_record=cfg.on_bad_record).records
    held = encode_prompts(tokenizer, records[: cfg.eval_prompts], cfg, print)
    rewards = {name: reward_from(cfg, spec, accelerator.device)
               for name, spec in (("reward", cfg.reward), ("gold", cfg.gold)) if spec}
    judge = None
    if cfg.judge_model or cfg.judge_url:
        judge = make_judge(cfg.judge_model or "smollm2-135m-instruct", cfg.judge_url, rollout=cfg.rollout)
    with accelerator.autocast():
        result = compare_policies(engine, reference.engine(policy, cfg.rollout, accelerator.device), policy, reference,
                                  tokenizer, rewards, held, cfg, seed=cfg.seed + 7, judge=judge)
    (run.path / "eval.json").write_text(json.dumps(result, indent=2))
    print(summary_line(result))
    run.finish(**{f"{name}_{k}": v for name, r in result["rewards"].items() for k, v in r.items()}, kl=result["kl"])
    write_report(run.path)
    print(f"report: {run.path / 'report.html'}")
    return run


__all__ = ["EvalPolicyConfig", "compare_policies", "paired", "run", "summary_line"]
