"""Blind human A/B evaluation (``rlhfkit eval policy --human``, ``rlhfkit annotate ab --eval-run RUN``
on an evaluation that ran before, or the pipeline's ``evaluate: {human: {...}}``): the tuned policy's and the reference's answers to the held-out
prompts of an ``eval policy`` run, side by side, for people to judge without being told which is which.

The answers come from the evaluation run's ``eval.json`` (same prompts, same seeds). Each item holds
the policy's answer and the reference's; the app shows them in a random left/right order per annotator,
and nothing on the page says which is which. Like ``annotate collect``, the stage stops as waiting
until ``min_judgements`` items are complete (``--wait`` polls), then reports:

* the **human win rate** of the policy: each judgement counts 1 for the policy, 0 for the reference and
  1/2 for a tie; an item's score is the mean of its judgements, the win rate the mean over items, with a
  95 % percentile-bootstrap interval that resamples items (``scipy.stats.bootstrap``);
* how often the policy's answer was shown on the left (the randomisation's balance);
* agreement between people (percent agreement, Krippendorff's α) and between the people's majority and
  each automatic judge the evaluation had: the reward model, the gold metric and the LLM judge (the share
  of items, among those both decided, where they pick the same answer).

The result is written to the stage's ``human.json`` and into the evaluation run's ``eval.json`` (key
``human``), whose report is rebuilt to show it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhfkit.config import RunArgs, announce
from rlhfkit.data.formats import TIE, majority
from rlhfkit.errors import ConfigError
from rlhfkit.eval.policy import EvalPolicyConfig
from rlhfkit.eval.policy import run as evaluate_policy
from rlhfkit.eval.report import write_report
from rlhfkit.people.collect import PeopleArgs, wait_for_people
from rlhfkit.people.projects import wrap
from rlhfkit.run import Run

try:  # the annotate extra
    from sqlalchemy import select

    from rlhfkit.people import store
    from rlhfkit.people.agreement import agreement, bootstrap_interval
    from rlhfkit.people.db import Item, Judgement
except ImportError:  # pragma: no cover - exercised only without the extra
    store = None

POLICY, REFERENCE = 0, 1  # the item's responses: [policy answer, reference answer]


@dataclass
class ABConfig(RunArgs, PeopleArgs):
    """Blind human A/B evaluation of a tuned policy against its reference, from an `eval policy` run."""

    eval_run: str = ""
    """The `eval policy` run directory whose held-out answers people compare."""

    def resolve(self) -> ABConfig:
        if not self.eval_run:
            raise ConfigError("annotate ab: --eval-run RUN (an `eval policy` run directory) is required")
        return self


def bootstrap_mean_ci(values: list[float], seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the mean (a point where every value is the same)."""
    if len(values) < 2 or len(set(values)) < 2:
        return [float(values[0])] * 2 if values else None
    v = np.asarray(values, dtype=float)
    return bootstrap_interval(len(v), lambda idx: v[idx].mean(), n_resamples=4000, seed=seed)


def preference(a: float, b: float) -> str:
    return "policy" if a > b else "reference" if b > a else TIE


def human_result(items: list, judgements: list, samples: list[dict], stats: dict) -> dict:
    """The human evaluation from the project's items and judgements and the evaluation's samples."""
    by_item: dict[int, list] = {i.id: [] for i in items}
    left_policy = 0
    for j in judgements:
        by_item[j.item_id].append(j.value["winner"])
        left_policy += j.order[0] == POLICY
    scores, votes = [], {}
    for item in items:
        winners = by_item[item.id]
        if not winners:
            continue
        scores.append(float(np.mean([1.0 if w == "a" else 0.5 if w == TIE else 0.0 for w in winners])))
        top, _ = majority(winners)
        votes[item.meta["sample"]] = {"a": "policy", "b": "reference"}.get(top, TIE)
    out = {"items": len(scores), "judgements": len(judgements),
           "win_rate": round(float(np.mean(scores)), 6) if scores else None,
           "win_rate_ci95": bootstrap_mean_ci(scores),
           "policy_shown_left": round(left_policy / len(judgements), 6) if judgements else None,
           "people": {k: stats.get(k) for k in ("percent_agreement", "percent_agreement_ci95", "krippendorff_alpha",
                                                "fleiss_kappa", "position_bias_left_wins", "length_bias_longer_wins")}}
    machines = {}
    for name in ("reward", "gold"):
        if samples and f"{name}_policy" in samples[0]:
            machines[name] = [preference(s[f"{name}_policy"], s[f"{name}_reference"]) for s in samples]
    if samples and "judge" in samples[0]:
        machines["judge"] = [s["judge"] or TIE for s in samples]
    out["people_vs"] = {}
    for name, picks in machines.items():
        both = [(votes[i], picks[i]) for i in votes if votes[i] != TIE and picks[i] != TIE]
        out["people_vs"][name] = {"agreement": round(sum(a == b for a, b in both) / len(both), 6) if both else None,
                                  "items": len(both)}
    return out


def run(cfg: ABConfig) -> Run:
    cfg.resolve()
    announce(cfg, "annotate ab", cfg.eval_run)
    eval_dir = Path(cfg.eval_run)
    if not (eval_dir / "eval.json").is_file():
        raise ConfigError(f"annotate ab: {eval_dir} has no eval.json (run `rlhfkit eval policy` first)")
    result = json.loads((eval_dir / "eval.json").read_text())
    samples = result.get("samples") or []
    run = Run.open(cfg, "human-eval", inputs={"eval": str(eval_dir / "eval.json")})
    project = cfg.project or run.path.name
    db = cfg.open()
    if not store.project_exists(db, project):
        items = [{"prompt": [{"role": "user", "content": s["prompt"]}], "responses": [s["policy"], s["reference"]],
                  "meta": {"sample": i}} for i, s in enumerate(samples)]
        guidelines = open(cfg.guidelines).read() if cfg.guidelines else (
            "Two answers to the same prompt, in random order. Choose the better one: helpful, honest, harmless. "
            "Choose a tie only when neither is better.")
        wrap(store.create_project, db, project, "pairwise", cfg.overlap, items, (), guidelines,
             {"strength": cfg.strength, "reason": True})
    wait_for_people(cfg, db, project, run)
    with db() as s:
        p = store.get_project(s, project)
        items = list(s.scalars(select(Item).where(Item.project_id == p.id, Item.is_gold.is_(False))))
        judgements = list(s.scalars(select(Judgement).where(Judgement.project_id == p.id)))
    human = {"project": project, **human_result(items, judgements, samples, agreement(db, project))}
    (run.path / "human.json").write_text(json.dumps(human, indent=1))
    result["human"] = human
    (eval_dir / "eval.json").write_text(json.dumps(result, indent=2))
    write_report(eval_dir)
    ci = human["win_rate_ci95"] or [None, None]
    print(f"human A/B ({human['items']} items, {human['judgements']} judgements): policy win rate "
          f"{human['win_rate']} (95% interval {ci[0]} to {ci[1]}); policy shown left {human['policy_shown_left']}")
    run.finish(win_rate=human["win_rate"], win_rate_ci95=human["win_rate_ci95"], items=human["items"])
    return run


# ------------------------------------------------------------------ `rlhfkit eval policy --human`


@dataclass
class EvalPolicyHumanConfig(EvalPolicyConfig):
    """Evaluate a policy against its reference on held-out prompts: reward, gold, KL, win rates,
    length and diversity, a sample table; writes eval.json and report.html. With --human, people then
    compare the same answers blind (see `rlhfkit annotate ab`)."""

    human: bool = False
    """Also put the policy's and the reference's answers to people, side by side in random order,
    unlabelled; the stage waits for them (run the same command again, or pass --wait). Needs --name."""
    human_dir: str = ""
    """The annotation folder for --human (default: <output-dir>/annotations)."""
    human_db: str = ""
    """Or a database URL for --human (postgresql://...)."""
    human_overlap: int = 3
    """Annotators per prompt for --human."""
    human_min_judgements: int = 0
    """Complete prompts needed for --human (0: all)."""
    wait: bool = False
    """With --human: poll until the people are done, instead of stopping as waiting."""

    def resolve(self) -> EvalPolicyHumanConfig:
        super().resolve()
        if self.human and not self.name:
            raise ConfigError("eval policy --human needs --name (the same command, run again, then finds the "
                              "evaluation and its annotation project)")
        return self


def run_eval_policy(cfg: EvalPolicyHumanConfig) -> Run:
    """``rlhfkit eval policy``: the evaluation, then with --human the blind A/B on its answers. An
    evaluation that finished before is not run again: only the people's part goes on."""
    cfg.resolve()
    if not cfg.human:
        return evaluate_policy(cfg)
    eval_dir = Path(cfg.output_dir) / cfg.name
    if Run(eval_dir, "eval-policy").manifest().get("status") == "finished" and (eval_dir / "eval.json").is_file():
        print(f"{eval_dir}: the evaluation finished before; going on with the people's judgements", file=sys.stderr)
    else:
        evaluate_policy(cfg)
    return run(ABConfig(eval_run=str(eval_dir), output_dir=cfg.output_dir, name=f"{cfg.name}-human",
                        seed=cfg.seed, progress=cfg.progress, dir=cfg.human_dir or str(Path(cfg.output_dir) / "annotations"),
                        db=cfg.human_db, project=cfg.name, overlap=cfg.human_overlap,
                        min_judgements=cfg.human_min_judgements, wait=cfg.wait))
